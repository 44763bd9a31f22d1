"""ONNX export of a geovae model: the graph, its metadata and the check against the torch module.

What the graph computes and the metadata it carries are described in :mod:`geovae.model.onnx`
and docs/model-format.md. The export runs torch's exporter; ``to_onnxruntime`` exports in
memory for ``--backend onnxruntime`` on a torch model file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from geovae._version import __version__
from geovae.choices import Precision
from geovae.errors import ModelFileError, OptionError
from geovae.model.base import ModelInfo, SegmentationModel, entropy
from geovae.model.onnx import (
    FORMAT_NAME,
    FORMAT_VERSION,
    OnnxModel,
    missing_onnx,
    ort_version,
    require_onnx,
)

if TYPE_CHECKING:
    import onnx


__all__ = ["check_export", "export_graph", "export_onnx", "to_onnxruntime"]

log = logging.getLogger("geovae.model")

#: Largest difference allowed between the exported graph and the torch module at export:
#: probabilities and entropies in absolute terms, the reconstruction error relative to its
#: largest value. fp32 graphs differ by rounding (~1e-6); anything near this is a wrong graph.
CHECK_TOLERANCE = 1e-3

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
        "object_maps": "VAE with object heads only: (B, 2, H, W) object extent and distance to the "
        "object's outline (0..1 each)",
    },
}


# ------------------------------------------------------------------------------ export
def _softmax(x: Tensor, dim: int) -> Tensor:
    """``x.softmax(dim)`` written out (max, exp, sum): onnxruntime's CPU Softmax over an axis
    that is not the last transposes the tensor there and back, and over the class axis of the
    samples' (S, B, K, H, W) logits that took 63 % of a run with 8 samples (the default VAE,
    a 560² tile); the written-out form is elementwise operators and reductions along K."""
    e = (x - x.amax(dim=dim, keepdim=True)).exp()
    return e / e.sum(dim=dim, keepdim=True)


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

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, ...]:
        from geovae.model.layers import ClassConditionalDecoder, LowRankHead

        net: Any = self.net
        h, mu, logvar = net._encode(x)
        n, b = noise.shape[0], mu.shape[0]
        zs = mu.unsqueeze(0) + noise * torch.exp(0.5 * logvar).unsqueeze(0)
        head = net.head
        if isinstance(head, LowRankHead):
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
        p = _softmax(sample_logits, 2)
        dec = net.recon_decoder
        if isinstance(dec, ClassConditionalDecoder):
            rec = dec.decode(dec.features(mu), mean_logits.argmax(1))
        else:
            rec = dec(mu)
        out: tuple[Tensor, ...] = (
            _softmax(mean_logits, 1),
            p.mean(0),
            entropy(p, dim=2).mean(0),
            ((rec - x) ** 2).mean(1),
        )
        if net.object_head is not None:
            out = (*out, net.object_head(h).sigmoid())
        return out


class _ProbsGraph(nn.Module):
    """What the exported graph of any other segmentation network computes: probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return _softmax(self.net(x), 1)


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
        raise missing_onnx("geovae export --onnx") from None
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
        if net.object_head is not None:
            outputs.append("object_maps")
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
    maps = model.supports_object_maps
    diffs: dict[str, float] = {}
    disagree = 0.0
    fp32 = model.with_precision("fp32")
    for samples, reconstruction in runs:
        outs = []
        for m in (fp32, onnx_model):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                outs.append(m.predict(x, samples=samples, reconstruction=reconstruction, objects=maps))
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
    check = {**check, "on": where, "export_s": round(export_s, 1), "onnxruntime": ort_version()}
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
