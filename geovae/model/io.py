"""Self-describing model files: safetensors weights plus JSON metadata, never pickle.

A geovae model file is one safetensors file. Its tensors are the module's ``state_dict``; its
header metadata (string to string, part of the safetensors format) holds ``format``
(``"geovae-model"``), ``format_version``, ``geovae_version`` and ``info``, the JSON of a
:class:`~geovae.model.base.ModelInfo` (architecture, bands, normalisation, classes, tile
size). Reading it parses JSON and copies raw tensor bytes; no code from the file can run.
See docs/model-format.md.

:func:`load_model` also reads Lightning checkpoints (:mod:`geovae.model.checkpoints`, with
``torch.load(weights_only=True)``) and TorchGeo weight sets (:mod:`geovae.model.pretrained`).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geovae._version import __version__
from geovae.atomic import atomic_path
from geovae.choices import BACKENDS, Backend, Precision
from geovae.errors import GeovaeError, ModelFileError, OptionError
from geovae.model.base import ModelInfo, SegmentationModel
from geovae.model.checkpoints import load_checkpoint, read_torch_file, torchgeo_module
from geovae.model.halo import HALO_METHOD, measure_halo
from geovae.model.pretrained import PREFIX as PRETRAINED_PREFIX
from geovae.model.state import load_state
from geovae.model.vae import VAESegmenter

#: The format this geovae writes; it reads this one and every older one. Version 2 added
#: ``arch.recon_condition`` (class-conditional reconstruction); version-1 files rebuild
#: with ``recon_condition="none"``, the only decoder they could hold. ``arch.head`` and
#: ``arch.head_rank`` (the low-rank stochastic head) came later within version 2: a file
#: without them rebuilds the MLP head it was written with (the constructor's default), and
#: an older geovae refuses a file with them (unknown architecture key), never misreads it.
FORMAT_VERSION = 2
FORMAT_NAME = "geovae-model"

# A safetensors header larger than this is not a model description but a broken/foreign file.
_MAX_HEADER = 100 * 1024 * 1024


def save_model(path: str | os.PathLike[str], module: VAESegmenter | nn.Module, info: ModelInfo) -> Path:
    """Write a model file that ``geovae segment`` can run with nothing else.

    For a :class:`VAESegmenter`, ``info.arch``, ``info.stride``, ``info.kind``,
    ``info.in_channels`` and ``info.num_classes`` are taken from the module. Any other module
    must be rebuildable from ``info.arch`` by its ``info.kind`` (``"torchgeo"``: the
    ``SemanticSegmentation`` hyperparameters ``model``, ``backbone``, ``in_channels``,
    ``num_classes``, ``num_filters``). The file appears under its final name only when
    complete.

    Args:
        path: destination; ``.safetensors`` is the recommended suffix, any is accepted.
        module: the trained module (moved to CPU copies; the module itself is not changed).
        info: the model's description (classes, bands, normalisation, tile size).

    Returns:
        The path written.

    Raises:
        ModelFileError: if the module cannot be described or the file cannot be written.
    """
    path = Path(path)
    d = info.to_dict()
    if isinstance(module, VAESegmenter):
        d.update(
            kind="geovae-vae",
            arch=module.hparams,
            stride=module.stride,
            in_channels=module.in_channels,
            num_classes=module.num_classes,
        )
    elif d.get("kind") == "torchgeo":
        if not d.get("arch") or "model" not in d["arch"]:
            raise ModelFileError("a TorchGeo model needs info.arch with its SemanticSegmentation hyperparameters")
    else:
        raise ModelFileError(
            f"cannot save a {type(module).__name__}: only VAESegmenter or a TorchGeo model (info.kind='torchgeo')"
        )
    d.setdefault("extra", {})
    d["extra"] = {**d["extra"], "geovae_version": __version__}
    ModelInfo.from_dict(d)  # validates list lengths before anything is written
    if d.get("halo") is None:
        d["halo"] = _halo(module, d)
        d["extra"]["halo_method"] = HALO_METHOD
    else:  # the caller's own figure (or one load_model measured, which says so): kept as is
        d["extra"].setdefault("halo_method", "given")
    # Shared storage (views) is not allowed by safetensors: clone every tensor.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "geovae_version": __version__,
        "info": json.dumps(d, sort_keys=True),
    }
    from safetensors.torch import save_file

    if not path.parent.exists():
        raise ModelFileError(f"{path}: folder {path.parent} does not exist; create it first")
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot write the model file ({exc.strerror or exc}); check the folder") from exc
    return path


def _sniff(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` (zip or legacy pickle), ``"onnx"`` or ``"unknown"``."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(_MAX_HEADER, size - 8) and head[8:9] == b"{":
            return "safetensors"
    if zipfile.is_zipfile(path):
        return "torch"
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch.save's legacy format
        return "torch"
    # An ONNX ModelProto starts with its ir_version field (tag 0x08); the name says it too.
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":
        return "onnx"
    return "unknown"


def _read_safetensors_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ModelFileError(f"{path}: corrupt model file ({exc}); re-export or re-download it") from exc


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The :class:`ModelInfo` of a geovae model file, without reading the weights.

    Args:
        path: a geovae model file (``.safetensors`` or ``.onnx``).

    Returns:
        Its description.

    Raises:
        ModelFileError: missing, foreign, corrupt or newer-format file.
    """
    path = _existing(path)
    kind = _sniff(path)
    if kind == "onnx":
        from geovae.model.onnx import read_onnx_info

        return read_onnx_info(path)
    if kind != "safetensors":
        raise ModelFileError(f"{path}: not a geovae model file (no safetensors header); use a file from geovae train")
    return _info_from_metadata(path, _read_safetensors_header(path))


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: model file not found; check the path")
    if not p.is_file():
        raise ModelFileError(f"{p}: is not a file; give the path of a model file")
    return p


def _info_from_metadata(path: Path, meta: dict[str, str]) -> ModelInfo:
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path}: a safetensors file without geovae metadata (foreign weights); "
            "use a model file written by geovae train"
        )
    try:
        version = int(meta["format_version"])
    except (KeyError, ValueError):
        raise ModelFileError(
            f"{path}: unknown model format version {meta.get('format_version')!r}; use a file from geovae train"
        ) from None
    if version > FORMAT_VERSION or version < 1:
        raise ModelFileError(
            f"{path}: model format version {version} (written by geovae {meta.get('geovae_version', '?')}) is "
            f"newer than this geovae {__version__} reads (up to {FORMAT_VERSION}); upgrade geovae"
        )
    try:
        info = ModelInfo.from_dict(json.loads(meta["info"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: corrupt model description ({exc}); re-export the model") from exc
    if version == 1 and info.kind == "geovae-vae":
        info.arch.setdefault("recon_condition", "none")
    return info


def _load_geovae(path: Path) -> tuple[nn.Module, ModelInfo]:
    info = _info_from_metadata(path, _read_safetensors_header(path))
    if info.kind not in ("geovae-vae", "torchgeo"):
        raise ModelFileError(f"{path}: unknown model kind {info.kind!r}; upgrade geovae")
    module: nn.Module | None = None
    if info.kind == "geovae-vae":
        try:
            module = VAESegmenter(**info.arch)
        except GeovaeError as exc:
            raise ModelFileError(f"{path}: cannot rebuild the model ({exc})") from exc
        except TypeError as exc:
            raise ModelFileError(f"{path}: corrupt architecture description ({exc}); re-export the model") from exc
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # truncated or damaged tensor data
        raise ModelFileError(f"{path}: corrupt model file ({exc}); re-export or re-download it") from exc
    if module is None:
        return torchgeo_module(path, info.arch, state), info
    load_state(path, module, state)
    return module, info


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "auto",
    amp: bool = True,
    precision: Precision = "auto",
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    class_ids: list[int] | None = None,
    class_names: list[str] | None = None,
    fold_batchnorm: bool = True,
    backend: Backend = "auto",
) -> SegmentationModel:
    """Load a model file, ready to predict.

    Reads a geovae model file (safetensors + JSON), a Lightning checkpoint (``.ckpt``,
    loaded with ``weights_only=True``) of a TorchGeo ``SemanticSegmentation`` task or of
    geovae's :class:`~geovae.training.VAESegmentationTask`, or a TorchGeo weight set named
    ``torchgeo:<Enum>.<MEMBER>`` (:mod:`geovae.model.pretrained`: built as TorchGeo builds
    it, its weights from torch.hub's cache or downloaded). A TorchGeo checkpoint carries no
    normalisation or class ids: by default pixels go in as read (mean 0, std 1) and output
    channel i is class i; a VAESegmentationTask checkpoint carries both in its
    hyperparameters. The keyword arguments override them (and any field of a geovae file).
    A geovae ONNX file (``geovae export --onnx``) runs with onnxruntime
    (:mod:`geovae.model.onnx`).

    Args:
        path: the model file, or ``torchgeo:NAME``.
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or a torch device.
        amp: allow mixed precision (False forces fp32).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see geovae.device.autocast_dtype).
        mean: per-band value subtracted before the model.
        std: per-band divisor.
        class_ids: raster value of each output channel.
        class_names: name of each class.
        fold_batchnorm: predict with BatchNorm folded into the convolutions (faster; the same
            classes, probabilities equal to ~1e-6). False reproduces the saved module's
            arithmetic bit for bit.
        backend: what runs the model: ``auto`` (the runtime of its file: onnxruntime for an
            ONNX file, torch for every other), ``torch`` or ``onnxruntime`` (a torch model is
            then exported to ONNX in memory first, :func:`geovae.model.onnx_export.to_onnxruntime`).

    Returns:
        A :class:`SegmentationModel` in eval mode on the device (an
        :class:`~geovae.model.onnx.OnnxModel` for onnxruntime).

    Raises:
        ModelFileError: missing, corrupt, foreign, pickled-object or newer-format file, or
            overrides of the wrong length; an unknown weight set or an encoder.
        DownloadError: a weight set that is not cached and cannot be downloaded.
        OptionError: an unknown backend, or ``torch`` for an ONNX file.
        MissingDependencyError: onnxruntime is needed and not installed.
    """
    if backend not in BACKENDS:
        raise OptionError(f"--backend {backend}: use one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        from geovae.model.onnx import require_onnx

        require_onnx("--backend onnxruntime")  # before the model is loaded
    p: Path | str
    if isinstance(path, str) and path.startswith(PRETRAINED_PREFIX):
        from geovae.model.pretrained import load_weights

        p = path
        module, info = load_weights(path)
    else:
        p = _existing(path)
        kind = _sniff(p)
        if kind == "onnx":
            if backend == "torch":
                raise OptionError(
                    f"--backend torch: {p} is an ONNX model, which runs with onnxruntime; use --backend auto"
                )
            from geovae.model.onnx import load_onnx

            overrides = _overrides(None, mean=mean, std=std, class_ids=class_ids, class_names=class_names)
            return load_onnx(p, device, precision if amp else "fp32", overrides=overrides)
        if kind == "safetensors":
            module, info = _load_geovae(p)
        elif kind == "torch":
            module, info = load_checkpoint(p, read_torch_file(p))
        else:
            raise ModelFileError(f"{p}: not a model file (neither geovae safetensors nor a TorchGeo checkpoint)")
    d = info.to_dict()
    d.update(_overrides(info, mean=mean, std=std, class_ids=class_ids, class_names=class_names))
    if d.get("halo") is None or d["extra"].get("halo_method") not in (HALO_METHOD, "given"):
        # A checkpoint, or a file whose halo was measured on white noise only (or not at all):
        # measured here, about a second (geovae.model.halo). Re-saving the file keeps it.
        d["halo"] = _halo(module, d)
        d["extra"] = {**d["extra"], "halo_method": HALO_METHOD}
    try:
        info = ModelInfo.from_dict(d)
    except ValueError as exc:
        raise ModelFileError(
            f"{p}: {exc} (the model has {info.in_channels} bands and {info.num_classes} classes)"
        ) from exc
    model = SegmentationModel(module, info, device=device, amp=amp, precision=precision, fold_batchnorm=fold_batchnorm)
    if backend == "onnxruntime":
        from geovae.model.onnx_export import to_onnxruntime

        return to_onnxruntime(model, precision if amp else "fp32")
    return model


def _overrides(
    info: ModelInfo | None,
    *,
    mean: list[float] | None,
    std: list[float] | None,
    class_ids: list[int] | None,
    class_names: list[str] | None,
) -> dict[str, Any]:
    """The :class:`ModelInfo` fields ``load_model``'s keyword arguments replace (class ids
    without names name their classes after the ids, when the count fits the model)."""
    d: dict[str, Any] = {}
    if class_ids is not None and class_names is None and (info is None or len(class_ids) == info.num_classes):
        d["class_names"] = [f"class {c}" for c in class_ids]
    for key, value in (("mean", mean), ("std", std), ("class_ids", class_ids), ("class_names", class_names)):
        if value is not None:
            d[key] = list(value)
    return d


def _halo(module: nn.Module, d: dict[str, Any]) -> int:
    """The model's halo (geovae.model.halo), measured on a CPU copy in fp32."""
    import copy

    m = copy.deepcopy(module).to("cpu", memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's overloads omit (device, memory_format=), which it takes
    return measure_halo(m, int(d["in_channels"]), int(d.get("stride") or 1))


def _per_band(name: str, values: Any, bands: int) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, str):
        try:
            values = [float(v) for v in values.replace(" ", "").split(",") if v]
        except ValueError:
            raise OptionError(f"--{name} {values!r}: expected numbers separated by commas, e.g. 0,0,0") from None
    vals = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(vals) == 1:
        vals = vals * bands  # one value for every band, as in "divide by 10000"
    if len(vals) != bands:
        raise OptionError(f"--{name}: {len(vals)} values for a model with {bands} bands; give one or {bands}")
    if name == "std" and any(v <= 0 for v in vals):
        raise OptionError("--std: every value must be positive")
    return vals


def export_model(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    mean: Any = None,
    std: Any = None,
    stats_from: str | os.PathLike[str] | None = None,
    classes: Any = None,
    tile_size: int | None = None,
    onnx: bool = False,
    check_with: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a self-describing geovae model file from a TorchGeo checkpoint (or a model file).

    A TorchGeo ``SemanticSegmentation`` checkpoint carries no band normalisation and no class
    ids; this records them once so that ``geovae segment`` and ``geovae batch`` need nothing
    but the exported file. Values not given keep what the source has. With ``onnx`` the file
    is an ONNX graph with the same description in its metadata, checked against the torch
    module before it is written (:func:`geovae.model.onnx_export.export_onnx`).

    Args:
        source: a TorchGeo ``.ckpt`` (read with ``weights_only=True``) or a geovae model file.
        out: the model file to write (appears only when complete).
        mean: per-band mean: one number for every band, a list, or ``"a,b,c"``.
        std: per-band divisor, in the same forms.
        stats_from: compute ``mean``/``std`` scene-wide from this raster (valid pixels only),
            as ``geovae train`` does; not together with ``mean``/``std``.
        classes: ``"1:developed,5:forest"`` or a mapping: output channel ``i`` is the
            ``i``-th class in ascending id order; there must be one per output channel.
        tile_size: the default prediction tile recorded in the file.
        onnx: write an ONNX file (``.onnx``) for onnxruntime instead of a safetensors file.
        check_with: with ``onnx``, a raster whose tiles the export is checked on (default:
            ``stats_from`` if given, else smooth random tiles in the training range).

    Returns:
        The path written.

    Raises:
        OptionError: bad values or counts that do not fit the model, or ``out`` not named
            ``.safetensors`` (``.onnx`` with ``onnx``).
        OutputError: ``out`` cannot be written, or is one of the input files.
        ModelFileError: the source cannot be read, cannot be exported to ONNX or the file
            cannot be written.
        MissingDependencyError: ``onnx`` without onnxruntime, onnx and onnxscript installed.
    """
    from geovae.atomic import check_not_inputs, check_output_file, check_output_suffix
    from geovae.bands import band_statistics
    from geovae.classes import parse_classes

    out = check_output_file(out, example="model.onnx" if onnx else "model.safetensors")
    if onnx:
        check_output_suffix(out, (".onnx",), writes="export --onnx writes an ONNX graph")
    else:
        check_output_suffix(
            out, (".safetensors",), writes="export writes a safetensors model file", fix="add --onnx to write ONNX"
        )
    check_not_inputs([out], [source, stats_from, check_with], fix="choose another --out file")
    if stats_from is not None and (mean is not None or std is not None):
        raise OptionError("--stats-from computes mean and std; do not also give --mean or --std")
    if check_with is not None and not onnx:
        raise OptionError("--check-with checks an ONNX export; add --onnx")
    if onnx:
        from geovae.model.onnx import require_onnx

        require_onnx("geovae export --onnx")  # before the source is loaded
        if (not isinstance(source, str) or not source.startswith(PRETRAINED_PREFIX)) and _sniff(
            _existing(source)
        ) == "onnx":
            raise OptionError(f"{source} is an ONNX file already; export its .safetensors or checkpoint instead")
    model = load_model(source, device="cpu", amp=False)
    info = model.info
    bands = info.in_channels
    m, sd = _per_band("mean", mean, bands), _per_band("std", std, bands)
    if stats_from is not None:
        _stats = band_statistics(stats_from)
        m, sd = _stats.mean, _stats.std
        if len(m) != bands:
            raise OptionError(f"--stats-from {stats_from}: has {len(m)} bands but the model takes {bands}")
    d = info.to_dict()
    if m is not None:
        d["mean"] = m
    if sd is not None:
        d["std"] = sd
    if classes is not None:
        spec = parse_classes(classes)
        if len(spec) != info.num_classes:
            raise OptionError(
                f"--classes names {len(spec)} classes but the model has {info.num_classes} output channels; "
                "give one ID:NAME per channel, in channel order"
            )
        d["class_ids"], d["class_names"] = list(spec), list(spec.values())
        if any(not 0 <= c <= 254 for c in spec):
            raise OptionError("--classes: class ids must be 0..254 (255 is the class raster's nodata)")
    if tile_size is not None:
        if tile_size < 1 or tile_size % max(info.stride, 1):
            raise OptionError(f"--tile {tile_size}: must be a positive multiple of the model stride {info.stride}")
        d["tile_size"] = int(tile_size)
    d["extra"] = {**d.get("extra", {}), "exported_from": os.path.basename(str(source))}
    if onnx:
        from geovae.model.onnx_export import export_onnx

        # The torch side of the check normalises with the exported description, as the graph's users will.
        info = ModelInfo.from_dict({**d, "extra": {**d["extra"], "geovae_version": __version__}})
        described = SegmentationModel(model.module, info, device="cpu", amp=False, fold_batchnorm=True)
        return export_onnx(described, out, check_with=check_with if check_with is not None else stats_from)[0]
    return save_model(out, model.module, ModelInfo.from_dict(d))
