"""The geovae ONNX file and the onnxruntime backend that runs it (the export:
:mod:`geovae.model.onnx_export`).

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
  reconstruction from the latent mean, in normalised units; for a VAE with object heads also
  ``object_maps`` (B, 2, H, W), the object extent and the distance to the object's outline.

onnxruntime computes every node of a graph whatever outputs are fetched, so
:class:`OnnxModel` runs a copy of the graph cut down to the outputs a run asks for
(``onnx.utils.Extractor``); outputs that do not need the samples are then computed from a
``noise`` of S = 0, whose shape only is read.

Reading a file parses protobuf (``onnx.load``); no code from the file runs: every node must
be an operator of the ONNX standard or onnxruntime's built-in contrib domain (or a function
the file itself defines from them), and geovae never registers custom operator libraries.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

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
    "SESSION_CONFIG",
    "OnnxModel",
    "describe_check",
    "load_onnx",
    "missing_onnx",
    "ort_version",
    "read_onnx_info",
    "require_onnx",
]

log = logging.getLogger("geovae.model")

FORMAT_NAME = "geovae-onnx"
#: The ONNX file layout this geovae writes and reads (inputs, outputs, metadata keys).
FORMAT_VERSION = 1
#: Operator domains a graph may use: the ONNX standard and onnxruntime's built-in contrib
#: operators. Anything else would need a custom operator library, which geovae never loads.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
#: Graph optimisation levels of onnxruntime, by the names geovae takes.
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
#: onnxruntime session configuration a model runs with: its intra-op threads sleep between
#: operators instead of spin-waiting, which is faster end to end on a small CPU and leaves the
#: cores to the run's helper threads and to other processes (docs/benchmarks.md; the
#: ``ort-spin`` side of benchmarks/bench_onnx.py measures the other way).
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


def missing_onnx(what: str) -> MissingDependencyError:
    """The one-line error for ``what`` when the ``onnx`` extra is not installed."""
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
        raise missing_onnx(what) from None
    return onnx, onnxruntime


def ort_version() -> str:
    """The installed onnxruntime's version (recorded in an export's check)."""
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


def _check_weights(path: Path, proto: onnx.ModelProto) -> None:
    """Refuse floating-point weights (initializers and constants) that are not finite, as
    :func:`geovae.model.state.check_state` does for the other model files: a graph exported
    from a diverged model segments every pixel as one class at confidence NaN."""
    from onnx import numpy_helper

    graphs = [proto.graph, *(g for n in proto.graph.node for a in n.attribute for g in (a.g, *a.graphs))]
    tensors = [(t.name, t) for g in graphs for t in g.initializer]
    for g in graphs:
        for n in g.node:
            if n.op_type == "Constant":
                tensors += [(n.output[0] if n.output else n.name, a.t) for a in n.attribute if a.name == "value"]
    for name, t in tensors:
        try:
            values = numpy_helper.to_array(t)
        except Exception as exc:  # a tensor whose bytes do not fit its shape and type
            raise ModelFileError(f"{path}: tensor {name} cannot be read ({exc}); re-export the model") from exc
        if np.issubdtype(values.dtype, np.floating) and not bool(np.isfinite(values).all()):
            raise ModelFileError(
                f"{path}: tensor {name} holds non-finite numbers (NaN or infinity): the model was exported from "
                "a training run whose loss diverged, or the file is damaged; retrain or re-export it"
            )


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
    _check_weights(p, proto)
    if overrides:
        try:
            info = ModelInfo.from_dict({**info.to_dict(), **overrides})
        except ValueError as exc:
            raise ModelFileError(
                f"{p}: {exc} (the model has {info.in_channels} bands and {info.num_classes} classes)"
            ) from exc
    return OnnxModel(proto, info, device=device, precision=precision)


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
        session_config: onnxruntime session configuration entries, over
            :data:`SESSION_CONFIG` (e.g. ``{"session.intra_op.allow_spinning": "1"}``), for
            benchmarks and tuning.

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
        self.session_config = {**SESSION_CONFIG, **(session_config or {})}
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
    def supports_object_maps(self) -> bool:
        return "object_maps" in self.outputs

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

    def _forward(self, x: Tensor, samples: int, reconstruction: bool, objects: bool = False) -> dict[str, Tensor]:
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
        if objects:
            names.append("object_maps")
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
        if objects:
            out["object_maps"] = torch.from_numpy(res["object_maps"])
        return out
