"""Lightning checkpoints a model can be loaded from, read with ``weights_only=True``.

``torch.load(weights_only=True)`` refuses any pickled object other than tensors and plain
containers, so no code from the file can run. Two kinds are read: TorchGeo
``SemanticSegmentation`` checkpoints (no normalisation, no class ids), whose network is
rebuilt as TorchGeo's task builds it, and checkpoints of geovae's own
:class:`~geovae.training.VAESegmentationTask` (``torchgeo fit``), whose hyperparameters carry
the normalisation and the classes. :func:`geovae.model.io.load_model` is the entry point.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geovae._version import __version__
from geovae.errors import GeovaeError, ModelFileError
from geovae.model.base import ModelInfo
from geovae.model.state import load_state
from geovae.model.vae import VAESegmenter


def torchgeo_stride(arch: dict[str, Any]) -> int:
    """The stride (the factor tile sides must be a multiple of) of a TorchGeo network."""
    # smp encoders reduce by 2**5; TorchGeo's own FCN keeps full resolution.
    return 1 if arch.get("model") == "fcn" else 32


#: TorchGeo's segmentation models that are segmentation_models_pytorch classes, by the
#: ``model`` name TorchGeo's task gives them.
SMP_CLASSES = {
    "unet": "Unet",
    "deeplabv3+": "DeepLabV3Plus",
    "upernet": "UPerNet",
    "segformer": "Segformer",
    "dpt": "DPT",
}


def build_torchgeo_model(arch: dict[str, Any], direct: bool = True) -> nn.Module:
    """The network of a TorchGeo ``SemanticSegmentation`` task with ``arch``'s hyperparameters.

    ``direct`` builds it as the task's ``configure_models`` does (the FCN from
    ``torchgeo.models``, the others from segmentation_models_pytorch) without importing
    ``torchgeo.tasks``, whose Lightning stack costs every run about 3 s and 100 MiB (the
    smp models skip torchgeo entirely: about 7 s and 330 MiB); :func:`torchgeo_module`
    falls back to the task itself if those weights do not fit.
    """
    task = arch.get("task", "multiclass")
    if task != "multiclass":
        raise ModelFileError(f"TorchGeo task {task!r} is not supported; geovae runs multiclass segmentation models")
    model, ins, k = arch.get("model"), arch.get("in_channels"), arch.get("num_classes")
    smp_class = SMP_CLASSES.get(model) if isinstance(model, str) and "backbone" in arch else None
    if direct and (smp_class is not None or (model == "fcn" and "num_filters" in arch)):
        if not isinstance(ins, int) or not isinstance(k, int):
            raise TypeError(f"in_channels={ins!r} and num_classes={k!r} are not integers")
        if smp_class is None:
            from torchgeo.models import FCN

            return FCN(in_channels=ins, classes=k, num_filters=arch["num_filters"])
        import segmentation_models_pytorch as smp

        return getattr(smp, smp_class)(encoder_name=arch["backbone"], encoder_weights=None, in_channels=ins, classes=k)
    from torchgeo.tasks import SemanticSegmentation

    kwargs = {k: arch[k] for k in ("model", "backbone", "in_channels", "num_classes", "num_filters") if k in arch}
    # weights=None: the checkpoint brings the weights, nothing is downloaded.
    return SemanticSegmentation(weights=None, task="multiclass", **kwargs).model


def torchgeo_module(path: Path, arch: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """A TorchGeo network rebuilt from ``arch`` with the weights ``state``."""
    try:
        module = build_torchgeo_model(arch)
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot rebuild the TorchGeo model {arch} ({exc})") from exc
    try:
        load_state(path, module, state, exact_dtype=False)
        return module
    except ModelFileError:
        pass  # built unlike this TorchGeo's task would: build it through the task itself
    try:
        module = build_torchgeo_model(arch, direct=False)
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot rebuild the TorchGeo model {arch} ({exc})") from exc
    load_state(path, module, state, exact_dtype=False)
    return module


def read_torch_file(path: Path) -> dict[str, Any]:
    """The dictionary a torch file holds, read without building any pickled object.

    Raises:
        ModelFileError: pickled Python objects, a damaged file, or anything but a dictionary.
    """
    try:
        # weights_only=True: only tensors and plain containers; any other object is refused
        # before it can be constructed, so a malicious checkpoint cannot run code.
        with warnings.catch_warnings():
            # torch warns about a pickle protocol it may not read before refusing the file;
            # the refusal (one line below) is what the user needs.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"{path}: holds pickled Python objects, which geovae refuses to load (they can run code); "
            "export the weights to a geovae model file"
        ) from exc
    except Exception as exc:
        raise ModelFileError(f"{path}: corrupt or unreadable torch file ({type(exc).__name__}); re-export it") from exc
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: a torch file that is not a TorchGeo checkpoint; use a geovae model file")
    return obj


def _is_vae_task(hp: dict[str, Any]) -> bool:
    """Hyperparameters of geovae's VAESegmentationTask (``torchgeo fit`` or a plain Lightning fit)."""
    if str(hp.get("_class_path", "")).rpartition(".")[2] == "VAESegmentationTask":
        return True
    return "model" not in hp and {"base_channels", "depth", "latent_channels"} <= hp.keys()


def _load_vae_task_checkpoint(path: Path, ckpt: dict[str, Any]) -> tuple[nn.Module, ModelInfo]:
    """A Lightning checkpoint of :class:`geovae.training.VAESegmentationTask`.

    The hyperparameters rebuild the :class:`VAESegmenter` and carry the normalisation and
    the classes (the task takes them from the data module); ``checkpoint["geovae"]`` adds
    the training tile and what the model was trained on. Only plain values are read.
    """
    hp, sd = ckpt["hyper_parameters"], ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise ModelFileError(f"{path}: a VAESegmentationTask checkpoint without weights (state_dict); re-save it")
    for key in ("in_channels", "num_classes"):
        if not isinstance(hp.get(key), int):
            raise ModelFileError(
                f"{path}: VAESegmentationTask checkpoint without an integer {key} (the task was never "
                "set up with its data); train with a data module that gives it, or set it"
            )
    arch = {"in_channels": hp["in_channels"], "num_classes": hp["num_classes"]}
    # A key missing from an older checkpoint takes the value that rebuilds the older model.
    for key, default in (
        ("base_channels", 32),
        ("depth", 4),
        ("latent_channels", 8),
        ("encoder", "unet"),
        ("recon_condition", "class"),
        ("head", "mlp"),
        ("head_rank", 2),
    ):
        arch[key] = hp.get(key, default)
    if any(k.startswith("model.object_head.") for k in sd):
        arch["object_heads"] = True
    try:
        module = VAESegmenter(**arch)
    except (GeovaeError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot rebuild the VAE segmenter {arch} ({exc})") from exc
    load_state(
        path, module, {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}, exact_dtype=False
    )
    c = hp["in_channels"]
    # The task's normalisation: its hyperparameters, else its buffers (identical when both exist).
    mean, std = hp.get("mean"), hp.get("std")
    if mean is None:
        mean = sd["band_mean"].flatten().tolist() if "band_mean" in sd else [0.0] * c
    if std is None:
        std = sd["band_std"].flatten().tolist() if "band_std" in sd else [1.0] * c
    geo = ckpt.get("geovae")
    if not isinstance(geo, dict):
        geo = {}
    tile = geo.get("tile_size")
    stride = module.stride
    tile = tile if isinstance(tile, int) and tile > 0 and tile % stride == 0 else max(stride, 256 // stride * stride)
    extra: dict[str, Any] = {}
    if isinstance(hp.get("encoder_weights"), str):
        from geovae.model.encoders import encoder_record

        unfreeze = hp.get("unfreeze_after")
        extra["encoder_weights"] = encoder_record(
            hp["encoder_weights"], bool(hp.get("freeze_encoder")), unfreeze if isinstance(unfreeze, int) else None
        )
    try:
        info = ModelInfo(
            in_channels=c,
            num_classes=hp["num_classes"],
            class_ids=list(hp.get("class_ids") or []),
            class_names=list(hp.get("labels") or []),
            class_colors=[tuple(v) for v in hp.get("class_colors") or []],
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            band_names=list(hp["band_names"]) if hp.get("band_names") else None,
            tile_size=int(tile),
            stride=stride,
            kind="geovae-vae",
            arch=module.hparams,
            training=dict(geo.get("training") or {}),
            extra={
                "source": "geovae VAESegmentationTask checkpoint",
                "epoch": ckpt.get("epoch"),
                "global_step": ckpt.get("global_step"),
                "data": geo.get("data"),
                "trainer": "geovae.training.VAESegmentationTask",
                "geovae_version": __version__,
                "loss": {k: hp.get(k) for k in ("beta", "free_bits", "kl_warmup_steps", "recon_weight", "dice_weight")},
                **extra,
            },
        )
    except ValueError as exc:
        raise ModelFileError(
            f"{path}: VAESegmentationTask checkpoint with unusable values ({exc}); re-train it"
        ) from exc
    return module, info


def load_checkpoint(path: Path, ckpt: dict[str, Any]) -> tuple[nn.Module, ModelInfo]:
    """The network and description of a TorchGeo or VAESegmentationTask checkpoint.

    Args:
        path: the file (for the messages).
        ckpt: what :func:`read_torch_file` read from it.

    Returns:
        The module with the checkpoint's weights and its :class:`ModelInfo` (halo not measured).

    Raises:
        ModelFileError: a checkpoint of another kind, or one that cannot be rebuilt.
    """
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, dict) and _is_vae_task(hp):
        return _load_vae_task_checkpoint(path, ckpt)
    sd = ckpt.get("state_dict")
    if not isinstance(hp, dict) or not isinstance(sd, dict) or "model" not in hp:
        raise ModelFileError(
            f"{path}: a torch file that is neither a geovae model nor a TorchGeo SemanticSegmentation checkpoint"
        )
    for key in ("in_channels", "num_classes"):
        if not isinstance(hp.get(key), int):
            raise ModelFileError(f"{path}: TorchGeo checkpoint without an integer {key}; it cannot be rebuilt")
    arch = {k: hp[k] for k in ("model", "backbone", "in_channels", "num_classes", "num_filters", "task") if k in hp}
    state = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    module = torchgeo_module(path, arch, state)
    labels = hp.get("labels")
    info = ModelInfo(
        in_channels=hp["in_channels"],
        num_classes=hp["num_classes"],
        class_names=list(labels) if isinstance(labels, (list, tuple)) and len(labels) == hp["num_classes"] else [],
        stride=torchgeo_stride(arch),
        kind="torchgeo",
        arch=arch,
        extra={
            "source": "torchgeo checkpoint",
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "geovae_version": __version__,
        },
    )
    return module, info
