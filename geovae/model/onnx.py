"""ONNX export of a geovae model and the onnxruntime backend that runs it.

An exported file is one ONNX model whose ``metadata_props`` describe it as fully as a
geovae ``.safetensors`` file's header does: ``format`` (``"geovae-onnx"``),
``format_version``, ``geovae_version``, ``info`` (the JSON of the
:class:`~geovae.model.base.ModelInfo`: bands, normalisation, classes and colours, halo,
training ranges for the trust check, extra), ``io`` (the graph's inputs and outputs in
words) and ``check`` (the export-time comparison with the torch module). See
docs/model-format.md.

The graph (the exporter's opset; dynamic batch, height, width and sample count):

* input ``x``: (B, C, H, W) float32 bands normalised with the file's ``mean`` and ``std``
  (``(pixel - mean) / std``), H and W multiples of the model's stride;
* input ``noise`` (VAE models only): (S, B, L, H / stride, W / stride) standard normal draws
  of the S latent samples. The graph holds no random operator: a caller draws the noise, so
  samples are reproducible, and geovae draws it exactly as the torch backend does (the same
  shape from torch's generator in the same order), so both backends give the same samples;
* outputs: ``probs`` (B, K, H, W) class probabilities at the latent mean; for a VAE also
  ``sample_probs`` (B, K, H, W), the mean over the S samples of their probabilities,
  ``expected_entropy`` (B, H, W), the mean of their entropies (nats), and
  ``reconstruction_error`` (B, H, W), the mean squared error over bands of the
  reconstruction from the latent mean, in normalised units.

onnxruntime computes every node of a graph whatever outputs are fetched, so
:class:`OnnxModel` runs a copy of the graph cut down to the outputs a run asks for
(``onnx.utils.Extractor``); outputs that do not need the samples are then computed from a
``noise`` of S = 0, whose shape only is read.

Reading a file parses protobuf (``onnx.load``); no code from the file runs: every node must
be an operator of the ONNX standard or onnxruntime's built-in contrib domain (or a function
the file itself defines from them), and geovae never registers custom operator libraries.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from geovae._version import __version__
from geovae.choices import Precision
from geovae.errors import MissingDependencyError, ModelFileError, ModelMismatchError, OptionError
from geovae.model.base import ModelInfo, SegmentationModel, entropy

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "OnnxModel",
    "check_export",
    "describe_check",
    "export_graph",
    "export_onnx",
    "load_onnx",
    "read_onnx_info",
    "require_onnx",
    "to_onnxruntime",
]

log = logging.getLogger("geovae.model")

FORMAT_NAME = "geovae-onnx"
#: The ONNX file layout this geovae writes and reads (inputs, outputs, metadata keys).
FORMAT_VERSION = 1
#: Operator domains a graph may use: the ONNX standard and onnxruntime's built-in contrib
#: operators. Anything else would need a custom operator library, which geovae never loads.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
#: Largest difference allowed between the exported graph and the torch module at export:
#: probabilities and entropies in absolute terms, the reconstruction error relative to its
#: largest value. fp32 graphs differ by rounding (~1e-6); anything near this is a wrong graph.
CHECK_TOLERANCE = 1e-3
#: Graph optimisation levels of onnxruntime, by the names geovae takes.
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

VAE_OUTPUTS = ("probs", "sample_probs", "expected_entropy", "reconstruction_error")
IO_DESCRIPTION = {
    "inputs": {
        "x": "(B, C, H, W) float32 bands, (pixel - info.mean) / info.std; H, W multiples of info.stride",
        "noise": "VAE only: (S, B, L, H / stride, W / stride) float32 standard normal draws of S latent "
        "samples (S = 0 when no sample output is fetched: only its shape is read)",
    },
    "outputs": {
        "probs": "(B, K, H, W) class probabilities at the latent mean",
        "sample_probs": "VAE only: (B, K, H, W) mean over the S samples of their class probabilities",
        "expected_entropy": "VAE only: (B, H, W) mean over the S samples of their entropy, nats",
        "reconstruction_error": "VAE only: (B, H, W) mean squared error over bands of the reconstruction "
        "from the latent mean, normalised units",
    },
}


def _missing(what: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"{what} needs onnxruntime and onnx, which are not installed; pip install geovae[onnx]"
    )


def require_onnx(what: str) -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, imported.

    Args:
        what: what needs them, for the message (``"model.onnx"``, ``"--backend onnxruntime"``).

    Raises:
        MissingDependencyError: one line naming the extra to install.
    """
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise _missing(what) from None
    return onnx, onnxruntime


# ------------------------------------------------------------------------------ export
class _VAEGraph(nn.Module):
    """What the exported graph of a :class:`~geovae.model.vae.VAESegmenter` computes.

    The computation of ``VAESegmenter.infer`` with the samples' noise as an input and every
    sample in one batch (S is a dimension of the graph, not a loop): ``z = mu + noise *
    exp(logvar / 2)`` as ``VAESegmenter._head_samples`` draws it, the head on every sample,
    the reconstruction from the latent mean and the class at the latent mean.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from geovae.model.vae import _ClassConditionalDecoder, _LowRankHead

        net: Any = self.net
        h, mu, logvar = net._encode(x)
        n, b = noise.shape[0], mu.shape[0]
        zs = mu.unsqueeze(0) + noise * torch.exp(0.5 * logvar).unsqueeze(0)
        head = net.head
        if isinstance(head, _LowRankHead):
            offset, factor = head.parts(h)
            mean_logits = head.logits(offset, factor, net._up(head.noise(mu), h))
            up = net._up(head.noise(zs.flatten(0, 1)), h).unflatten(0, (n, b))
            k = head.num_classes
            sample_logits = offset.unsqueeze(0)
            for i in range(head.rank):
                sample_logits = sample_logits + factor[:, i * k : (i + 1) * k].unsqueeze(0) * up[:, :, i : i + 1]
        else:
            mean_logits = net._head(h, mu)
            hs = h.unsqueeze(0).expand(n, *h.shape).flatten(0, 1)
            sample_logits = head(torch.cat([hs, net._up(zs.flatten(0, 1), hs)], dim=1)).unflatten(0, (n, b))
        p = sample_logits.softmax(dim=2)
        dec = net.recon_decoder
        if isinstance(dec, _ClassConditionalDecoder):
            rec = dec.decode(dec.features(mu), mean_logits.argmax(1))
        else:
            rec = dec(mu)
        return mean_logits.softmax(1), p.mean(0), entropy(p, dim=2).mean(0), ((rec - x) ** 2).mean(1)


class _ProbsGraph(nn.Module):
    """What the exported graph of any other segmentation network computes: probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).softmax(1)


def _is_vae(model: SegmentationModel) -> bool:
    from geovae.model.vae import VAESegmenter

    return isinstance(model.net, VAESegmenter)


def export_graph(model: SegmentationModel) -> onnx.ModelProto:
    """The ONNX graph of a torch model (the module it predicts with, BatchNorm folded), fp32.

    Exported with ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript), with
    dynamic batch, height and width (multiples of the stride) and, for a VAE, sample count.

    Args:
        model: a torch :class:`SegmentationModel` (as :func:`~geovae.model.io.load_model` gives).

    Returns:
        The graph, without geovae's metadata.

    Raises:
        MissingDependencyError: onnx or onnxscript is not installed.
        ModelFileError: the exporter cannot express the model.
    """
    require_onnx("geovae export --onnx")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter writes the graph with it)
    except ImportError:
        raise _missing("geovae export --onnx") from None
    if isinstance(model, OnnxModel):
        raise OptionError("this model is an ONNX graph already; export its torch model file instead")
    info = model.info
    net = copy.deepcopy(model.net).to("cpu", memory_format=torch.contiguous_format).float().eval()  # type: ignore[call-overload]  # torch's overloads omit (device, memory_format=), which it takes
    stride = max(1, info.stride)
    side = max(2 * stride, -(-64 // stride) * stride)
    batch = torch.export.Dim("batch", min=1)
    if stride > 1:
        hh, ww = torch.export.Dim("height", min=1), torch.export.Dim("width", min=1)
        x_dims: dict[int, Any] = {0: batch, 2: stride * hh, 3: stride * ww}
    else:
        hh, ww = torch.export.Dim("height", min=1), torch.export.Dim("width", min=1)
        x_dims = {0: batch, 2: hh, 3: ww}
    x = torch.zeros(2, info.in_channels, side, side)
    graph: nn.Module
    if _is_vae(model):
        latent = int(net.latent_channels)
        graph = _VAEGraph(net)
        args: tuple[Tensor, ...] = (x, torch.zeros(2, 2, latent, side // stride, side // stride))
        dims: dict[str, Any] = {"x": x_dims, "noise": {0: torch.export.Dim("samples", min=0), 1: batch, 3: hh, 4: ww}}
        names, outputs = ["x", "noise"], list(VAE_OUTPUTS)
    else:
        graph, args, dims = _ProbsGraph(net), (x,), {"x": x_dims}
        names, outputs = ["x"], ["probs"]
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                graph.eval(),
                args,
                dynamo=True,
                dynamic_shapes=dims,
                input_names=names,
                output_names=outputs,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"cannot export this {info.kind} model to ONNX ({type(exc).__name__}: {first})") from exc
    assert program is not None
    proto: onnx.ModelProto = program.model_proto
    return proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's progress lines and warnings belong to its own debugging, not to a user."""
    import io

    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_onnx_log.setLevel(level)


def _with_metadata(proto: onnx.ModelProto, info: ModelInfo, check: dict[str, Any] | None) -> onnx.ModelProto:
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "geovae_version": __version__,
        "info": json.dumps(info.to_dict(), sort_keys=True),
        "io": json.dumps(IO_DESCRIPTION, sort_keys=True),
    }
    if check is not None:
        meta["check"] = json.dumps(check, sort_keys=True)
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name, proto.producer_version = "geovae", __version__
    proto.doc_string = (
        f"geovae {info.kind} segmentation model: {info.in_channels} bands, {info.num_classes} classes "
        f"({', '.join(info.class_names)}); metadata_props 'info' describes it (docs/model-format.md)"
    )
    return proto


def check_tiles(
    info: ModelInfo, raster: str | os.PathLike[str] | None = None, *, count: int = 4
) -> tuple[np.ndarray, str]:
    """Tiles to compare the exported graph with the torch module on, raw pixel values.

    From ``raster``: ``count`` windows of the model's tile size (or the raster, when smaller)
    with the most valid pixels among a spread of candidates, nodata filled with the model's
    means as a run fills it. Without one: smooth random fields within the training pixels'
    0.5-99.5 % range (the file's quantiles; mean +- 2 std when it records none).

    Returns:
        ``(tiles, description)``: (count, C, T, T) float32 and where they come from.

    Raises:
        OptionError: the raster's band count does not fit the model.
        SceneError: the raster cannot be read.
    """
    stride = max(1, info.stride)
    mean = np.asarray(info.mean, dtype=np.float32)
    if raster is not None:
        from rasterio.windows import Window

        from geovae.scene import open_scene

        sc = open_scene(str(raster), pixel_coords=True)
        try:
            if sc.count != info.in_channels:
                raise OptionError(
                    f"--check-with {raster}: has {sc.count} bands but the model takes {info.in_channels}; "
                    "give a scene of the model's bands"
                )
            side = min(info.tile_size, sc.height // stride * stride, sc.width // stride * stride)
            if side < stride:
                raise OptionError(
                    f"--check-with {raster}: smaller than the model's stride {stride}; give a larger scene"
                )
            rows = np.linspace(0, sc.height - side, 3).astype(int)
            cols = np.linspace(0, sc.width - side, 3).astype(int)
            found = []
            for r in rows:
                for c in cols:
                    data, valid = sc.read(Window(int(c), int(r), side, side))
                    sc.fill_missing(data, valid, mean)
                    found.append((float(valid.mean()), data.astype(np.float32)))
        finally:
            sc.close()
        found.sort(key=lambda t: -t[0])
        tiles = np.stack([d for _, d in found[:count]])
        return tiles, f"{len(tiles)} windows of {side}x{side} px of {os.path.basename(str(raster))}"
    q = info.training.get("quantiles") or {}
    lo = np.asarray(q.get("0.005") or (mean - 2 * np.asarray(info.std)), dtype=np.float32)
    hi = np.asarray(q.get("0.995") or (mean + 2 * np.asarray(info.std)), dtype=np.float32)
    side = max(stride, info.tile_size // stride * stride)
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((count, info.in_channels, max(2, side // 16), max(2, side // 16)), np.float32))
    fields = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False).numpy()
    tiles = lo[None, :, None, None] + fields * (hi - lo)[None, :, None, None]
    return tiles.astype(np.float32), f"{count} smooth random tiles of {side}x{side} px in the training range"


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, ref in a.items():
        ref_np, got = np.asarray(ref), np.asarray(b[k])
        out[k] = float(np.abs(ref_np - got).max()) if ref_np.size else 0.0
    return out


def check_export(model: SegmentationModel, onnx_model: OnnxModel, tiles: np.ndarray) -> dict[str, Any]:
    """The largest differences between the torch and the onnxruntime backend on ``tiles``.

    Both predict the same raw tiles through :meth:`SegmentationModel.predict` (normalisation,
    chunking, the samples' noise from the same seed): at the latent mean, and for a VAE also
    with 2 latent samples and the reconstruction error. Also the fraction of pixels whose
    class (argmax) differs.

    Returns:
        ``{"max_abs_diff": {output: d}, "class_disagreement": f, "tiles": n}``.

    Raises:
        ModelFileError: a difference above :data:`CHECK_TOLERANCE` (a wrong graph).
    """
    x = np.ascontiguousarray(tiles, dtype=np.float32)
    runs: list[tuple[int, bool]] = [(0, model.supports_reconstruction)]
    if model.supports_samples:
        runs.append((2, False))
    diffs: dict[str, float] = {}
    disagree = 0.0
    fp32 = model.with_precision("fp32")
    for samples, reconstruction in runs:
        outs = []
        for m in (fp32, onnx_model):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                outs.append(m.predict(x, samples=samples, reconstruction=reconstruction))
        d = _compare(outs[0], outs[1])
        suffix = "" if samples == 0 else f" ({samples} samples)"
        for k, v in d.items():
            diffs[k + suffix] = v
        disagree = max(disagree, float((outs[0]["probs"].argmax(1) != outs[1]["probs"].argmax(1)).mean()))
        for k, v in d.items():
            scale = max(1.0, float(np.abs(outs[0][k]).max())) if k == "reconstruction_error" else 1.0
            if v > CHECK_TOLERANCE * scale:
                raise ModelFileError(
                    f"the exported ONNX graph differs from the torch model by {v:.3g} in {k}{suffix} "
                    f"(more than {CHECK_TOLERANCE * scale:.3g}); it was not written; please report this model's architecture"
                )
    return {"max_abs_diff": diffs, "class_disagreement": disagree, "tiles": len(x)}


def export_onnx(
    model: SegmentationModel,
    out: str | os.PathLike[str],
    *,
    check_with: str | os.PathLike[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write ``model`` as a self-describing ONNX file, checked against the torch module first.

    Args:
        model: a torch :class:`SegmentationModel` with its final :class:`ModelInfo`.
        out: the ``.onnx`` file (appears under its name only when complete and checked).
        check_with: a raster whose tiles the check runs on (:func:`check_tiles`).

    Returns:
        ``(path, check)``: the file and the check's record (also in the file's metadata).

    Raises:
        MissingDependencyError: onnx, onnxscript or onnxruntime is not installed.
        ModelFileError: the model cannot be exported, or the graph does not match it.
        OutputError: the file cannot be written.
    """
    from geovae.atomic import atomic_path

    onnx_mod, _ = require_onnx("geovae export --onnx")
    t0 = time.perf_counter()
    proto = export_graph(model)
    export_s = time.perf_counter() - t0
    info = model.info
    tiles, where = check_tiles(info, check_with)
    check = check_export(model, OnnxModel(_with_metadata(proto, info, None), info, device="cpu"), tiles)
    check = {**check, "on": where, "export_s": round(export_s, 1), "onnxruntime": _ort_version()}
    _with_metadata(proto, info, check)
    onnx_mod.checker.check_model(proto)
    path = Path(out)
    try:
        data = proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GiB limit
        raise ModelFileError(f"{path}: the model is too large for one ONNX file ({exc})") from exc
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path, check


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


# ------------------------------------------------------------------------------ reading
def _load_proto(path: Path) -> onnx.ModelProto:
    onnx_mod, _ = require_onnx(str(path))
    try:
        proto: onnx.ModelProto = onnx_mod.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors for a damaged file
        raise ModelFileError(f"{path}: not a readable ONNX file ({type(exc).__name__}); re-export it") from exc
    return proto


def _info_from_proto(path: Path, proto: onnx.ModelProto) -> ModelInfo:
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path}: an ONNX file without geovae metadata; geovae runs ONNX files written by geovae export --onnx"
        )
    try:
        version = int(meta["format_version"])
    except (KeyError, ValueError):
        raise ModelFileError(f"{path}: unknown geovae ONNX format version {meta.get('format_version')!r}") from None
    if not 1 <= version <= FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: geovae ONNX format version {version} (written by geovae {meta.get('geovae_version', '?')}) is "
            f"newer than this geovae {__version__} reads (up to {FORMAT_VERSION}); upgrade geovae"
        )
    try:
        return ModelInfo.from_dict(json.loads(meta["info"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: corrupt model description ({exc}); re-export the model") from exc


def _check_graph(path: Path, proto: onnx.ModelProto) -> None:
    """Refuse operators outside the standard domains, and a graph without geovae's inputs/outputs."""
    local = {(f.domain, f.name) for f in proto.functions}
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    for node in nodes:
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in local:
            raise ModelFileError(
                f"{path}: uses operator {node.op_type} of domain {node.domain!r}, which needs a custom operator "
                "library; geovae runs only standard ONNX operators"
            )
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if "x" not in inputs or "probs" not in outputs:
        raise ModelFileError(f"{path}: the graph lacks geovae's input x or output probs; re-export the model")


def describe_check(path: str | os.PathLike[str]) -> str:
    """One line on the export-time check a geovae ONNX file records (its ``check`` metadata).

    Raises:
        MissingDependencyError: onnx is not installed.
        ModelFileError: not a readable ONNX file.
    """
    p = Path(path)
    meta = {m.key: m.value for m in _load_proto(p).metadata_props}
    if "check" not in meta:
        return f"{p}: not checked against the torch model"
    c = json.loads(meta["check"])
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in c["max_abs_diff"].items())
    return (
        f"checked against the torch model on {c['on']}: max |difference| {diffs}; "
        f"classes differ on {100 * c['class_disagreement']:.3f} % of pixels"
    )


def read_onnx_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The :class:`ModelInfo` of a geovae ONNX file.

    Raises:
        MissingDependencyError: onnx is not installed.
        ModelFileError: not a geovae ONNX file, corrupt, or a newer format.
    """
    p = Path(path)
    return _info_from_proto(p, _load_proto(p))


def load_onnx(
    path: str | os.PathLike[str],
    device: str | torch.device = "auto",
    precision: Precision = "auto",
    *,
    overrides: dict[str, Any] | None = None,
) -> OnnxModel:
    """A geovae ONNX file, ready to predict with onnxruntime.

    Args:
        path: the ``.onnx`` file.
        device: ``auto`` (CUDA when onnxruntime has its CUDA provider and a GPU is present),
            ``cpu`` or ``cuda[:N]``.
        precision: ``auto`` or ``fp32`` (the graph is fp32).
        overrides: :class:`ModelInfo` fields to replace (``mean``, ``std``, ``class_ids``,
            ``class_names``): the normalisation is applied outside the graph.

    Raises:
        MissingDependencyError: onnxruntime or onnx is not installed.
        ModelFileError: not a geovae ONNX file, corrupt, newer, or with custom operators.
        OptionError: a precision other than fp32, or CUDA where onnxruntime cannot use it.
    """
    p = Path(path)
    proto = _load_proto(p)
    info = _info_from_proto(p, proto)
    _check_graph(p, proto)
    if overrides:
        try:
            info = ModelInfo.from_dict({**info.to_dict(), **overrides})
        except ValueError as exc:
            raise ModelFileError(
                f"{p}: {exc} (the model has {info.in_channels} bands and {info.num_classes} classes)"
            ) from exc
    return OnnxModel(proto, info, device=device, precision=precision)


def to_onnxruntime(model: SegmentationModel, precision: Precision = "auto") -> OnnxModel:
    """A torch model exported in memory and run with onnxruntime (``--backend onnxruntime``).

    The export takes seconds to tens of seconds (logged); ``geovae export --onnx`` writes it
    once instead.

    Args:
        model: a torch model.
        precision: ``auto`` or ``fp32``.

    Raises:
        MissingDependencyError: onnxruntime, onnx or onnxscript is not installed.
        ModelFileError: the model cannot be exported.
        OptionError: bf16 or fp16.
    """
    if isinstance(model, OnnxModel):
        return model.with_precision(precision)
    require_onnx("--backend onnxruntime")
    if precision not in ("auto", "fp32"):
        raise OptionError(
            f"--precision {precision}: an ONNX model runs in fp32 with onnxruntime; "
            "use --precision auto or fp32, or --backend torch"
        )
    t0 = time.perf_counter()
    proto = export_graph(model)
    log.info(
        "exported the model to ONNX in memory in %.1f s (geovae export --onnx writes it once)",
        time.perf_counter() - t0,
    )
    device: str | torch.device = model.device
    return OnnxModel(_with_metadata(proto, model.info, None), model.info, device=device)


# ------------------------------------------------------------------------------ backend
def _ort_device(device: str | torch.device, providers: Sequence[str]) -> torch.device:
    """The device an ONNX model runs on: CUDA only where onnxruntime has its CUDA provider."""
    cuda_ep = "CUDAExecutionProvider" in providers
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if cuda_ep and torch.cuda.is_available() else torch.device("cpu")
    from geovae.device import resolve_device

    dev = resolve_device(name)
    if dev.type == "cuda" and not cuda_ep:
        raise OptionError(
            f"--device {name}: this onnxruntime has no CUDA execution provider; pip install onnxruntime-gpu, "
            "or use --device cpu or --backend torch"
        )
    return dev


class OnnxModel(SegmentationModel):
    """A geovae ONNX graph run with onnxruntime, behind the :class:`SegmentationModel` interface.

    ``predict`` takes and returns what the torch backend does (raw pixels in; probabilities,
    expected entropy of latent samples, reconstruction error out), chunks a CPU batch the same
    way and draws the samples' noise from torch's generator exactly as the torch module would,
    so a run's outputs match the torch backend's (to rounding) and everything downstream
    (trust check, blending, sinks, report) is unchanged.

    Args:
        proto: the graph with geovae's metadata (:func:`load_onnx`, :func:`to_onnxruntime`).
        info: the model's description.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (CUDA needs onnxruntime-gpu).
        precision: ``auto`` or ``fp32``.
        threads: onnxruntime's intra-op threads; None: torch's thread count when the first
            session is made, the run's CPU budget (``OMP_NUM_THREADS``,
            ``torch.set_num_threads``), as the torch backend uses.
        optimization: onnxruntime's graph optimisation level, one of
            :data:`OPTIMIZATION_LEVELS` (``all``: constant folding, operator fusions and, on
            the CPU, the NCHWc layout of its convolution kernels).
        session_config: onnxruntime session configuration entries (e.g.
            ``{"session.intra_op.allow_spinning": "0"}``), for benchmarks and tuning.

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        OptionError: bf16/fp16, or CUDA without onnxruntime's CUDA provider.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        proto: onnx.ModelProto,
        info: ModelInfo,
        device: str | torch.device = "auto",
        precision: Precision = "auto",
        *,
        threads: int | None = None,
        optimization: str = "all",
        session_config: dict[str, str] | None = None,
    ) -> None:
        _, ort = require_onnx("an ONNX model")
        if precision not in ("auto", "fp32", None):
            raise OptionError(
                f"--precision {precision}: an ONNX model runs in fp32 with onnxruntime; "
                "use --precision auto or fp32, or --backend torch"
            )
        if optimization not in OPTIMIZATION_LEVELS:
            raise OptionError(f"optimization={optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
        self.info = info
        self.device = _ort_device(device, ort.get_available_providers())
        self.amp_dtype = None
        self.proto = proto
        self.threads = threads
        self.optimization = optimization
        self.session_config = dict(session_config or {})
        self.inputs = [i.name for i in proto.graph.input]
        self.outputs = [o.name for o in proto.graph.output]
        self.latent_channels: int | None = None
        if "noise" in self.inputs:
            dims = next(i for i in proto.graph.input if i.name == "noise").type.tensor_type.shape.dim
            self.latent_channels = int(dims[2].dim_value)
        self._sessions: dict[tuple[str, ...], onnxruntime.InferenceSession] = {}
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __getstate__(self) -> dict[str, Any]:
        # Sessions do not pickle; they are made again where the model arrives.
        return {**self.__dict__, "_sessions": {}}

    def with_precision(self, precision: Precision) -> OnnxModel:
        if precision not in ("auto", "fp32"):
            raise OptionError(
                f"--precision {precision}: an ONNX model runs in fp32 with onnxruntime; "
                "use --precision auto or fp32, or --backend torch"
            )
        return self

    @property
    def supports_samples(self) -> bool:
        return "sample_probs" in self.outputs

    @property
    def supports_reconstruction(self) -> bool:
        return "reconstruction_error" in self.outputs

    @property
    def providers(self) -> list[str]:
        """The execution providers a session runs on, in order of preference."""
        if self.device.type == "cuda":
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def session_options(self) -> onnxruntime.SessionOptions:
        """onnxruntime's options for this model's sessions (threads, optimisation, config)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        so.log_severity_level = 3  # errors only: its warnings are about the graph, not the user's run
        for k, v in self.session_config.items():
            so.add_session_config_entry(k, v)
        return so

    def session(self, outputs: tuple[str, ...]) -> onnxruntime.InferenceSession:
        """The session computing exactly ``outputs`` (the graph cut down to them), made once."""
        s = self._sessions.get(outputs)
        if s is not None:
            return s
        import onnx.utils
        import onnxruntime as ort

        proto = self.proto
        if set(outputs) != set(self.outputs):
            proto = onnx.utils.Extractor(proto).extract_model(list(self.inputs), list(outputs))
        opts: list[Any] = []
        for p in self.providers:
            opts.append({"device_id": str(self.device.index or 0)} if p == "CUDAExecutionProvider" else {})
        s = ort.InferenceSession(
            proto.SerializeToString(), self.session_options(), providers=self.providers, provider_options=opts
        )
        self._sessions[outputs] = s
        return s

    def normalise(self, x: Tensor) -> Tensor:
        """Raw pixel values -> the graph's input ``x`` (on the CPU: onnxruntime takes host arrays)."""
        return ((x.to("cpu", torch.float32) - self._mean) / self._std).contiguous()

    def _forward(self, x: Tensor, samples: int, reconstruction: bool) -> dict[str, Tensor]:
        b, c, h, w = x.shape
        stride = max(1, self.info.stride)
        if c != self.info.in_channels:
            raise ModelMismatchError(
                f"input has {c} bands but the model expects {self.info.in_channels}; use a scene with the model's bands"
            )
        if h % stride or w % stride:
            raise ModelMismatchError(
                f"tile size {h}x{w} is not a multiple of the model stride {stride}; "
                f"use a tile size that is a multiple of {stride}"
            )
        sampled = samples > 0 and self.supports_samples
        names = ["sample_probs", "expected_entropy"] if sampled else ["probs"]
        if reconstruction:
            names.append("reconstruction_error")
        feeds = {"x": self.normalise(x).numpy()}
        if "noise" in self.inputs:
            assert self.latent_channels is not None
            shape = (samples if sampled else 0, b, self.latent_channels, h // stride, w // stride)
            # The draw VAESegmenter._head_samples makes: torch's generator of the model's device.
            noise = torch.randn(shape, device=self.device) if sampled else torch.zeros(shape)
            feeds["noise"] = noise.cpu().numpy()
        res = dict(zip(names, self.session(tuple(names)).run(names, feeds)))
        out: dict[str, Tensor] = {}
        if sampled:
            out["probs"] = torch.from_numpy(res["sample_probs"])
            out["expected_entropy"] = torch.from_numpy(res["expected_entropy"])
        else:
            out["probs"] = torch.from_numpy(res["probs"])
            if samples > 0:
                # A deterministic model: every sample is the same, so no mutual information.
                out["expected_entropy"] = entropy(out["probs"], dim=1)
        if reconstruction:
            out["reconstruction_error"] = torch.from_numpy(res["reconstruction_error"])
        return out
