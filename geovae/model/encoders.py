"""TorchGeo's pretrained encoders as the start of the VAE's training (``--encoder-weights``).

An encoder weight set (:func:`~geovae.model.pretrained.catalogue`, kind ``encoder``) can start
the VAE when its TorchGeo builder is also a segmentation_models_pytorch encoder of the same
name: the ResNets, which TorchGeo builds with timm, whose tensors carry smp's names. The VAE
then takes that encoder (``smp:resnet18``) and keeps its own decoders, latent and heads;
:func:`load_encoder` copies the weights in, fetched by TorchGeo's builder through torch.hub's
cache (:func:`~geovae.model.pretrained.fetch_network`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from geovae.errors import GeovaeError, ModelFileError, OptionError
from geovae.model.pretrained import WeightSet, catalogue, fetch_network, weight_set

if TYPE_CHECKING:
    from torch import nn

__all__ = ["encoder_architecture", "encoder_record", "encoder_weight_set", "load_encoder"]


def _smp_encoder_names() -> set[str]:
    import segmentation_models_pytorch as smp

    return set(smp.encoders.get_encoder_names())


def encoder_weight_set(name: str) -> WeightSet:
    """The encoder weight set ``name`` (``torchgeo:`` optional) that training can start from.

    It must be an encoder whose TorchGeo builder is also a segmentation_models_pytorch
    encoder of the same name (the ResNets: TorchGeo builds them with timm, whose ResNet
    tensors are named as smp's): the VAE takes that encoder (``smp:<name>``) and keeps its
    own decoders, latent and heads.

    Raises:
        ModelFileError: no such weight set.
        OptionError: a segmentation network, or an encoder the VAE cannot build on.
    """
    ws = weight_set(name)
    usable = sorted({w.builder for w in catalogue("encoder") if w.builder in _smp_encoder_names()})
    if ws.kind != "encoder":
        raise OptionError(
            f"encoder weights {ws.name}: a whole segmentation network, not an encoder; use it with "
            f"`geovae segment --model {ws.reference}`, or pick an encoder from `geovae models --kind encoder`"
        )
    if ws.builder not in usable:
        raise OptionError(
            f"encoder weights {ws.name}: a {ws.architecture} encoder, which the VAE cannot build on; "
            f"use a {', '.join(usable)} weight set (`geovae models --kind encoder`)"
        )
    return ws


def encoder_architecture(ws: WeightSet) -> str:
    """The VAE ``encoder`` argument that takes the weights of ``ws`` (``smp:resnet18``)."""
    return f"smp:{ws.builder}"


def encoder_record(name: str, freeze_encoder: bool, unfreeze_after: int | None) -> dict[str, Any]:
    """What a model file records of the weight set its encoder started from
    (``extra.encoder_weights``): name, licence and provenance, and how it was frozen.

    Args:
        name: the weight set's name, as the task was given it.
        freeze_encoder: whether the encoder started frozen.
        unfreeze_after: the epoch it started training at, or None.

    Returns:
        Plain values only. A name this TorchGeo does not know (a checkpoint from another
        version) is recorded alone.
    """
    try:
        ws = encoder_weight_set(name)
    except GeovaeError:
        return {"name": name, "frozen": bool(freeze_encoder), "unfreeze_after": unfreeze_after}
    return {
        "name": ws.name,
        "license": ws.license,
        "url": ws.url,
        "dataset": ws.dataset,
        "publication": ws.publication,
        "repo": ws.repo,
        "normalisation": ws.normalisation,
        "frozen": bool(freeze_encoder),
        "unfreeze_after": unfreeze_after,
    }


def load_encoder(encoder: nn.Module, ws: WeightSet) -> None:
    """Copy the weights of ``ws`` into a VAE's segmentation_models_pytorch encoder.

    Every tensor of ``encoder`` is taken from the weight set (the classifier's ``fc`` of the
    pretrained network is left out); nothing is left at its random initialisation.

    Args:
        encoder: the smp encoder (``VAESegmenter.encoder.encoder``).
        ws: an encoder weight set (:func:`encoder_weight_set`).

    Raises:
        DownloadError: the weights are not cached and cannot be downloaded.
        ModelFileError: the weights do not fit the encoder, or the cached file does not load.
    """
    state = fetch_network(ws).state_dict()
    own = encoder.state_dict()
    misfit = [k for k, v in own.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
    if misfit:
        raise ModelFileError(
            f"{ws.file}: the weights of {ws.name} do not fit the {encoder_architecture(ws)} encoder "
            f"({len(misfit)} of {len(own)} tensors, e.g. {misfit[0]}); delete the file to download it again"
        )
    encoder.load_state_dict({k: state[k] for k in own}, strict=True)
