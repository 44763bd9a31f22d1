"""TorchGeo's pretrained weight sets, by name: ``torchgeo:Unet_Weights.NAIP_RGBN_RESNET18_CHESAPEAKERSC``.

TorchGeo ships pretrained weights as the members of its ``*_Weights`` enums (torchvision's
``WeightsEnum``): each has a ``url``, the ``transforms`` its inputs went through in training
and a ``meta`` dict (``in_chans``, ``bands``, ``num_classes``, ``classes``, ``resolution``,
``license``...). This module reads every member of every such enum in ``torchgeo.models``
(no list of its own) and sorts them:

* A **segmentation** weight set is a whole network: its meta names an architecture that
  TorchGeo's ``SemanticSegmentation`` task builds (``model: U-Net`` and an ``encoder``)
  with integer ``in_chans`` and ``num_classes``. :func:`load_weights` builds it with
  TorchGeo's own builder (``torchgeo.models.unet(weights=...)``: the network from
  segmentation_models_pytorch, the weights through ``torch.hub`` into
  ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``, a progress bar and the hash in
  the file name checked on download, ``torch.load(weights_only=True)``, a strict load) and
  describes it as a :class:`~geovae.model.base.ModelInfo`, so every command that takes a
  model takes ``torchgeo:NAME`` (:func:`geovae.model.io.load_model` resolves it).
* An **encoder** is every other weight set with a fixed band layout (an integer
  ``in_chans``) and a named architecture (``model`` or ``encoder``): a backbone to start
  training from. Weight sets without either (weather, location or pixel time-series models,
  spectrally flexible ones) are not listed: no scene's bands can be checked against them.
  ``geovae train --encoder-weights NAME`` starts the VAE from one whose TorchGeo builder is
  also a segmentation_models_pytorch encoder (the ResNets): :func:`encoder_weight_set`,
  :func:`load_encoder`.

The normalisation is read from the weight set's ``transforms`` by running them: constant
images at three levels go through, and a per-band affine map ``(x - mean) / std`` is fitted
and checked (spatial steps such as a resize or crop leave a constant image constant).
Transforms that are not such a map are reported as such and the set is not loaded. When the
map only divides (every mean 0), the weights expect pixel values from 0 to the divisor
(``x / 255``: 8-bit values; ``x / 10000``: reflectance scaled by 10,000): that range is
recorded for the trust check (``ModelInfo.training["expected_range"]``), so a scene in other
units is refused with one line saying what the weights expect.

Class names come from the meta's ``classes``; the Fields of the World sets give none, and
take the classes of TorchGeo's ``FieldsOfTheWorld`` dataset (background, field and, for the
3-class sets, the field boundary, named ``boundary`` so that ``segment --objects field``
splits fields along it); any other set without names gets ``class N``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
import math
import os
import re
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from geovae.errors import DownloadError, ModelFileError

if TYPE_CHECKING:
    from torch import nn
    from torchvision.models._api import WeightsEnum

    from geovae.model.base import ModelInfo

__all__ = [
    "PREFIX",
    "WeightSet",
    "catalogue",
    "fetch_network",
    "is_reference",
    "load_weights",
    "weight_set",
    "weights_file",
]

log = logging.getLogger("geovae.model")

#: What marks a TorchGeo weight set where a model file is expected.
PREFIX = "torchgeo:"

WeightKind = Literal["segmentation", "encoder"]

#: Class names of the datasets whose weight sets do not name their classes, by (meta
#: ``dataset``, ``num_classes``). Fields of the World: TorchGeo's ``FieldsOfTheWorld``
#: dataset, classes 0 background, 1 field, 2 field-boundary (its 3-class targets); the
#: boundary takes geovae's boundary-class name (geovae.objects.BOUNDARY_NAME).
_DATASET_CLASSES: dict[tuple[str, int], tuple[str, ...]] = {
    ("FTW", 2): ("background", "field"),
    ("FTW", 3): ("background", "field", "boundary"),
}

#: Levels the transforms are probed at: 0, one that fixes the scale, one that checks the
#: map is affine between them.
_PROBE_LEVELS = (0.0, 10000.0, 1234.5)
_PROBE_SIZE = 256


@dataclass(frozen=True)
class WeightSet:
    """One TorchGeo weight set, as geovae reads it from the enum member's ``meta`` and ``transforms``.

    Attributes:
        name: ``<Enum>.<MEMBER>``, e.g. ``Unet_Weights.SENTINEL2_3CLASS_FTW``.
        kind: ``segmentation`` (a whole network, for segment) or ``encoder`` (for train).
        architecture: the meta's ``model`` (and ``encoder``), e.g. ``U-Net (efficientnet-b3)``.
        builder: the ``torchgeo.models`` function that builds it (``get_model`` name), or None.
        in_channels: bands the network takes.
        bands: the band names, in order, when the meta gives as many as ``in_channels``.
        num_classes: output classes of a segmentation set; None for an encoder.
        class_names: a name per class (segmentation sets).
        resolution: the training data's pixel size in metres, when the meta gives it.
        license: the weights' licence as the meta states it, or None when it states none.
        dataset: the data the weights were trained on.
        ssl_method: the self-supervised method of an encoder, when given.
        publication, repo: where the weights come from.
        url: where ``torch.hub`` downloads them from.
        mean, std: the per-band affine map of the transforms, ``(x - mean) / std``; None
            when the transforms are not such a map.
        normalisation: the map in words (``x / 255``), or why it is unknown.
        expected_range: per band the pixel values the weights expect (``[0, divisor]``)
            when the map only divides; None otherwise.
        tile_size: the input size the meta gives (``input_shape``), or None.
        segmentation_arch: for a segmentation set, the ``SemanticSegmentation``
            hyperparameters that rebuild it (``model``, ``backbone``, ``in_channels``,
            ``num_classes``): what a model file records.
    """

    name: str
    kind: WeightKind
    architecture: str
    builder: str | None
    in_channels: int
    bands: tuple[str, ...] | None
    num_classes: int | None
    class_names: tuple[str, ...] | None
    resolution: float | None
    license: str | None
    dataset: str | None
    ssl_method: str | None
    publication: str | None
    repo: str | None
    url: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    normalisation: str
    expected_range: tuple[tuple[float, float], ...] | None
    tile_size: int | None
    segmentation_arch: dict[str, Any] | None = None

    @property
    def member(self) -> WeightsEnum:
        """The TorchGeo enum member itself: what its builders take as ``weights=``."""
        return _members()[self.name][0]

    @property
    def reference(self) -> str:
        """What ``--model`` takes: ``torchgeo:<name>``."""
        return PREFIX + self.name

    @property
    def file(self) -> Path:
        """Where ``torch.hub`` keeps (or will keep) the weights (:func:`weights_file`)."""
        return weights_file(self.url)

    @property
    def cached(self) -> bool:
        """Whether the weights are in ``torch.hub``'s cache (no download needed)."""
        return self.file.is_file()

    @property
    def size(self) -> int | None:
        """The weights file's size in bytes when cached (the meta gives no size)."""
        try:
            return self.file.stat().st_size
        except OSError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (what ``geovae models --json`` prints)."""
        return {
            "name": self.name,
            "reference": self.reference,
            "kind": self.kind,
            "use": "geovae segment --model " + self.reference if self.kind == "segmentation" else "encoder (for train)",
            "architecture": self.architecture,
            "builder": self.builder,
            "in_channels": self.in_channels,
            "bands": list(self.bands) if self.bands else None,
            "num_classes": self.num_classes,
            "classes": list(self.class_names) if self.class_names else None,
            "resolution_m": self.resolution,
            "license": self.license,
            "dataset": self.dataset,
            "ssl_method": self.ssl_method,
            "publication": self.publication,
            "repo": self.repo,
            "url": self.url,
            "file": str(self.file),
            "cached": self.cached,
            "size_bytes": self.size,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "normalisation": self.normalisation,
            "expected_range": [list(r) for r in self.expected_range] if self.expected_range else None,
            "tile_size": self.tile_size,
        }


def is_reference(model: object) -> bool:
    """Whether ``model`` names a TorchGeo weight set (``torchgeo:NAME``) rather than a file."""
    return isinstance(model, str) and model.startswith(PREFIX)


def weights_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps the file of ``url``.

    ``$TORCH_HOME/hub/checkpoints/<the URL's file name>`` (``torch.hub.get_dir()``): a file
    there is loaded without a download; its hash is checked only when it is downloaded.
    """
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)


# ----------------------------------------------------------------------- the catalogue
def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _segmentation_model_name(meta: dict[str, Any]) -> str | None:
    """The ``SemanticSegmentation`` ``model`` name of a whole segmentation network, or None.

    A weight set is one when its meta gives integer ``in_chans`` and ``num_classes``, an
    ``encoder`` and a ``model`` that names one of the architectures TorchGeo's task builds
    from segmentation_models_pytorch (``U-Net`` is ``unet``): those are the networks a geovae
    model file can rebuild (geovae.model.checkpoints).
    """
    from geovae.model.checkpoints import SMP_CLASSES

    model, encoder = meta.get("model"), meta.get("encoder")
    if not (isinstance(meta.get("in_chans"), int) and isinstance(meta.get("num_classes"), int)):
        return None
    if not isinstance(model, str) or not isinstance(encoder, str):
        return None
    key = _squash(model)
    for task_name, smp_class in SMP_CLASSES.items():
        if key in (_squash(task_name), _squash(smp_class)):
            return task_name
    return None


def _sig(v: float) -> float:
    """``v`` to 10 significant digits: the transform's own number, without the probe's rounding."""
    return 0.0 if v == 0 or not math.isfinite(v) else float(f"{v:.10g}")


def _affine(transforms: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | str:
    """The transforms' per-band map ``(x - mean) / std``, or why they are not one.

    Constant images at :data:`_PROBE_LEVELS` go through the transforms as one float64 batch
    (TorchGeo's torchvision and kornia transforms take a batch); each output must be
    constant per band (a resize or crop of a constant image is), and the third level must
    land where the first two put it. Weight sets share transforms: each is probed once.
    """
    return _affine_cached(transforms, channels)


@functools.lru_cache(maxsize=256)
def _affine_cached(transforms: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | str:
    import torch

    levels = torch.tensor(_PROBE_LEVELS, dtype=torch.float64).view(-1, 1, 1, 1)
    x = levels.expand(len(_PROBE_LEVELS), channels, _PROBE_SIZE, _PROBE_SIZE).clone()
    try:
        with torch.no_grad():
            y = transforms(x)
    except Exception as exc:  # a transform that takes another input (a dict, a sample)
        return f"its transforms do not run on an image batch ({type(exc).__name__})"
    if not isinstance(y, torch.Tensor) or y.ndim != 4 or y.shape[:2] != x.shape[:2]:
        return "its transforms do not return an image batch of the same bands"
    flat = y.reshape(len(_PROBE_LEVELS), channels, -1).double()
    if bool(((flat.amax(2) - flat.amin(2)).abs() > 1e-9 * (1 + flat.abs().amax(2))).any()):
        return "its transforms change a constant image (not a per-band affine map)"
    y0, y1, y2 = flat.mean(2)
    scale = (y1 - y0) / (_PROBE_LEVELS[1] - _PROBE_LEVELS[0])
    if not bool((scale > 0).all()):
        return "its transforms do not increase with the pixel value"
    predicted = y0 + scale * (_PROBE_LEVELS[2] - _PROBE_LEVELS[0])
    if not bool(torch.allclose(predicted, y2, rtol=1e-9, atol=1e-9)):
        return "its transforms are not a per-band affine map"
    std = 1.0 / scale
    mean = -y0 * std
    return tuple(_sig(float(v)) for v in mean), tuple(_sig(float(v)) for v in std)


def _describe_map(mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    def one(values: tuple[float, ...]) -> str:
        vals = [f"{v:g}" for v in values]
        return vals[0] if len(set(vals)) == 1 else "[" + ", ".join(vals) + "]"

    if all(m == 0 for m in mean):
        return "pixels as they are" if all(s == 1 for s in std) else f"x / {one(std)}"
    return f"(x - {one(mean)}) / {one(std)}"


def _optional_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _describe(name: str, member: WeightsEnum, builder: str | None) -> WeightSet | None:
    meta: dict[str, Any] = dict(member.meta)
    in_chans = meta.get("in_chans")
    seg_name = _segmentation_model_name(meta)
    arch_name = _optional_str(meta.get("model")) or _optional_str(meta.get("encoder"))
    if seg_name is None and not (isinstance(in_chans, int) and arch_name):
        return None
    if seg_name is not None and builder is None:  # a whole network TorchGeo cannot build by name
        return None
    assert isinstance(in_chans, int) and arch_name is not None  # both hold for either kind
    kind: WeightKind = "segmentation" if seg_name is not None else "encoder"
    architecture = arch_name
    if _optional_str(meta.get("model")) and _optional_str(meta.get("encoder")):
        architecture = f"{meta['model']} ({meta['encoder']})"
    bands = meta.get("bands")
    band_names = tuple(str(b) for b in bands) if isinstance(bands, (list, tuple)) and len(bands) == in_chans else None
    affine = _affine(member.transforms, in_chans)
    mean = std = expected = None
    if isinstance(affine, str):
        normalisation = affine
    else:
        mean, std = affine
        normalisation = _describe_map(mean, std)
        if all(m == 0 for m in mean) and not all(s == 1 for s in std):
            expected = tuple((0.0, s) for s in std)
    resolution = meta.get("resolution")
    shape = meta.get("input_shape")
    tile = int(shape[-1]) if isinstance(shape, (list, tuple)) and shape and isinstance(shape[-1], int) else None
    num_classes = class_names = seg_arch = None
    if kind == "segmentation":
        num_classes = int(meta["num_classes"])
        given = meta.get("classes")
        if isinstance(given, (list, tuple)) and len(given) == num_classes:
            class_names = tuple(str(c) for c in given)
        else:
            class_names = _DATASET_CLASSES.get((str(meta.get("dataset")), num_classes))
        seg_arch = {
            "model": seg_name,
            "backbone": str(meta["encoder"]),
            "in_channels": in_chans,
            "num_classes": num_classes,
        }
    return WeightSet(
        name=name,
        kind=kind,
        architecture=architecture,
        builder=builder,
        in_channels=in_chans,
        bands=band_names,
        num_classes=num_classes,
        class_names=class_names,
        resolution=float(resolution) if isinstance(resolution, (int, float)) and resolution > 0 else None,
        license=_optional_str(meta.get("license")),
        dataset=_optional_str(meta.get("dataset")),
        ssl_method=_optional_str(meta.get("ssl_method")),
        publication=_optional_str(meta.get("publication")),
        repo=_optional_str(meta.get("repo")),
        url=member.url,
        mean=mean,
        std=std,
        normalisation=normalisation,
        expected_range=expected,
        tile_size=tile,
        segmentation_arch=seg_arch,
    )


@functools.cache
def _members() -> dict[str, tuple[WeightsEnum, str | None]]:
    """Every member of every ``*_Weights`` enum of ``torchgeo.models`` with its builder's name."""
    import torchgeo.models as tgm
    from torchvision.models._api import WeightsEnum

    builders: dict[type, str] = {}
    for model_name in tgm.list_models():
        try:
            builders.setdefault(tgm.get_model_weights(model_name), model_name)
        except KeyError:  # a builder without pretrained weights
            continue
    out: dict[str, tuple[WeightsEnum, str | None]] = {}
    for obj in vars(tgm).values():
        if isinstance(obj, type) and issubclass(obj, WeightsEnum) and obj is not WeightsEnum:
            members: list[WeightsEnum] = list(obj)  # type: ignore[call-overload]  # an Enum class iterates over its members
            for member in members:
                out[f"{obj.__name__}.{member.name}"] = (member, builders.get(obj))
    return out


@functools.cache
def _catalogue() -> tuple[WeightSet, ...]:
    sets = [ws for name, (m, b) in _members().items() if (ws := _describe(name, m, b)) is not None]
    return tuple(sorted(sets, key=lambda w: (w.kind != "segmentation", w.name)))


def catalogue(kind: WeightKind | None = None) -> list[WeightSet]:
    """The weight sets geovae can use: segmentation sets first, then encoders, by name.

    Args:
        kind: only ``segmentation`` or only ``encoder`` sets; None for both.

    Returns:
        The :class:`WeightSet` of each.
    """
    return [w for w in _catalogue() if kind is None or w.kind == kind]


def weight_set(reference: str) -> WeightSet:
    """The weight set a ``torchgeo:NAME`` reference (or a bare ``NAME``) names.

    Raises:
        ModelFileError: no such weight set (with the closest names), or one geovae cannot use.
    """
    name = reference[len(PREFIX) :] if reference.startswith(PREFIX) else reference
    for ws in _catalogue():
        if ws.name == name:
            return ws
    members = _members()
    if name in members:
        raise ModelFileError(
            f"{PREFIX}{name}: a TorchGeo weight set without a fixed band layout or a segmentation "
            "network, which geovae cannot run; `geovae models` lists the ones it can"
        )
    close = difflib.get_close_matches(name, [w.name for w in _catalogue()], n=2, cutoff=0.9)
    hint = f"did you mean {' or '.join(PREFIX + c for c in close)}? " if close else ""
    raise ModelFileError(f"{PREFIX}{name}: no such TorchGeo weight set; {hint}`geovae models` lists them")


# ---------------------------------------------------------------------------- loading
def _download_failure(exc: BaseException) -> str:
    """One line on why torch.hub's download failed."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{exc.reason}"
    return " ".join(str(exc).split()) or type(exc).__name__


def fetch_network(ws: WeightSet) -> nn.Module:
    """The network of a weight set with its weights, as TorchGeo's builder makes it.

    ``torchgeo.models.get_model(builder, weights=member)``: TorchGeo's builder makes the
    network, fetches the state dict through ``torch.hub`` (the cached file, else a download
    with a progress bar on stderr and its hash checked) and loads it. torch.hub's
    "Downloading" line, which it prints on standard output, becomes an info log line, so
    standard output stays the command's own and a failed download is one error line.

    Raises:
        DownloadError: the file is not cached and cannot be downloaded (offline, refused,
            failed hash check): the message names the URL and where to put the file.
        ModelFileError: a cached file that cannot be loaded into the network.
    """
    import torchgeo.models as tgm

    builder = ws.builder
    assert builder is not None  # callers take only sets with a builder
    target = ws.file
    had_file = target.is_file()
    if not had_file:
        log.info("downloading the weights of %s from %s into %s", ws.name, ws.url, target)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module: nn.Module = tgm.get_model(builder, weights=ws.member)
    except Exception as exc:  # TorchGeo's builders assert that the weights fit
        if not had_file and not target.is_file():
            raise DownloadError(
                f"cannot download the weights of {ws.name} from {ws.url} ({_download_failure(exc)}); "
                f"download that file where there is network access and put it at {target}, then run again"
            ) from exc
        raise ModelFileError(
            f"{target}: the weights of {ws.name} cannot be loaded ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); delete the file to download it again"
        ) from exc
    return module


def build_network(ws: WeightSet) -> nn.Module:
    """The network of a segmentation weight set with its weights, built as TorchGeo builds it
    (:func:`fetch_network`), in eval mode.

    Raises:
        DownloadError: the file is not cached and cannot be downloaded.
        ModelFileError: a cached file that cannot be loaded into the network.
    """
    return fetch_network(ws).eval()


def model_info(ws: WeightSet) -> ModelInfo:
    """The :class:`ModelInfo` of a segmentation weight set (halo not measured).

    Raises:
        ModelFileError: an encoder, or transforms geovae cannot reproduce.
    """
    from geovae._version import __version__
    from geovae.model.base import ModelInfo
    from geovae.model.checkpoints import torchgeo_stride

    if ws.kind != "segmentation" or ws.segmentation_arch is None or ws.num_classes is None:
        raise ModelFileError(
            f"{ws.reference}: an encoder (pretrained for train), not a segmentation model; "
            "`geovae models` lists the segmentation weight sets"
        )
    if ws.mean is None or ws.std is None:
        raise ModelFileError(f"{ws.reference}: geovae cannot reproduce its normalisation: {ws.normalisation}")
    arch = dict(ws.segmentation_arch)
    stride = torchgeo_stride(arch)
    tile = ws.tile_size if ws.tile_size and ws.tile_size % stride == 0 else 256
    training: dict[str, Any] = {}
    if ws.expected_range is not None:
        training = {
            "expected_range": [list(r) for r in ws.expected_range],
            "expected_range_note": f"its transforms compute {ws.normalisation}",
        }
    return ModelInfo(
        in_channels=ws.in_channels,
        num_classes=ws.num_classes,
        class_names=list(ws.class_names or []),
        mean=list(ws.mean),
        std=list(ws.std),
        band_names=list(ws.bands) if ws.bands else None,
        tile_size=tile,
        stride=stride,
        kind="torchgeo",
        arch=arch,
        training=training,
        extra={
            "source": "torchgeo weights",
            "weights": {
                "name": ws.name,
                "url": ws.url,
                "license": ws.license,
                "dataset": ws.dataset,
                "resolution_m": ws.resolution,
                "normalisation": ws.normalisation,
                "publication": ws.publication,
                "repo": ws.repo,
            },
            "geovae_version": __version__,
        },
    )


def load_weights(reference: str) -> tuple[nn.Module, ModelInfo]:
    """The network and description of ``torchgeo:NAME``, as :func:`geovae.model.io.load_model` takes them.

    Args:
        reference: ``torchgeo:<Enum>.<MEMBER>`` of a segmentation weight set.

    Returns:
        ``(module, info)``: the network in eval mode on the CPU with TorchGeo's weights, and
        its description (normalisation, bands, classes, expected range, licence).

    Raises:
        ModelFileError: an unknown name, an encoder, transforms geovae cannot reproduce, or a
            cached file that does not load.
        DownloadError: the weights are not cached and cannot be downloaded.
    """
    ws = weight_set(reference)
    info = model_info(ws)  # refuses encoders before anything is downloaded
    return build_network(ws), info
