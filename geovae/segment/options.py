"""The options of a segmentation run, validated once.

:class:`SegmentOptions` is the one place segment options are checked: the CLI, the Python
API and :mod:`geovae.batch` all build one (the batch client before any scene reaches a
worker), and batch's resume fingerprint is computed from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from geovae.choices import BACKENDS, PRECISIONS, Backend, Precision
from geovae.errors import OptionError
from geovae.products import PolygonFormat, polygon_format

__all__ = ["Flag", "SegmentOptions"]

#: Options that change how fast the outputs are written, not what is written: a batch
#: marker made with other values is still trusted on resume.
SPEED_ONLY = frozenset({"device", "backend", "batch_size", "progress", "force"})


@dataclass(frozen=True)
class Flag:
    """How the command line spells one option (:mod:`geovae.cli.segment` builds its click options
    from these, so the command line and the Python API share one list of options, with no
    click import here).

    Attributes:
        help: the option's help text.
        kind: ``"str"``, ``"int"``, ``"float"`` (with ``low``/``high``: the range the command
            line refuses outside of, as a usage error), ``"choice"`` (``choices``), ``"flag"``
            (an on/off flag), ``"switch"`` (``--x/--no-x``, unset when neither is given) or
            ``"formats"`` (a comma-separated list of polygon formats).
        low, high, low_open: the range of an ``int`` or ``float``.
        choices: the values of a ``choice``.
        flag: the option's name when it is not the field's (``--no-quicklook``: a flag that
            turns the option off).
        cli_default: the command line's default when it differs from the field's.
        show_default: show the default in ``--help``.
    """

    help: str
    kind: str = "str"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    flag: str | None = None
    cli_default: Any = None
    show_default: bool = False


def _cli(help: str, **flag: Any) -> dict[str, Flag]:
    """A field's metadata: its command-line spelling (:class:`Flag`)."""
    return {"flag": Flag(help, **flag)}


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment a scene. Every field is checked when the object is made.

    Attributes:
        tile: tile side in pixels; None for the model's training tile size, enlarged until
            the default overlap is at most a quarter of it (:func:`geovae.segment.spec.tiling`).
        overlap: pixels shared by neighbouring tiles; None for enough to cover the model's
            halo on both sides (at least ``tile // 4``).
        batch_size: tiles per model call; None (the default) for about half a megapixel of
            tiles (8 tiles of 256², 2 of 512², 1 of 1024²).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``; None keeps a loaded model's own.
        backend: what runs the model: ``auto`` (onnxruntime for a ``.onnx`` file, torch for
            every other model), ``torch`` or ``onnxruntime`` (a torch model is exported to
            ONNX in memory first; :mod:`geovae.model.onnx`).
        samples: latent samples per tile; > 0 writes the uncertainty raster.
        reconstruction: write the reconstruction-error (anomaly) raster. None (the default)
            writes it when the model file records its training reconstruction error, so that
            the run can flag pixels unlike the training data.
        tta: average predictions over horizontal and vertical flips (3x the model time).
        min_area: drop polygons smaller than this (m^2; pixels in pixel coordinates).
        simplify: topology-preserving simplification tolerance (metres, or pixels).
        formats: polygon formats among ``geojson``, ``gpkg``, ``parquet``; None for the
            default (``geojson``, ``gpkg`` in pixel coordinates); empty for none.
        pixel_coords: accept a scene without CRS; outputs in pixel coordinates.
        nodata: value marking missing pixels, overriding the scene's nodata tag.
        block_size: output block side (rounded to a multiple of ``tile - overlap``).
        quicklook: write the PNG quicklook.
        progress: show progress bars.
        force: run even when the scene lies far outside the model's training data
            (:mod:`geovae.segment.trust`); the run then warns and flags those pixels.
        objects: class names or ids to turn into one polygon per object
            (:mod:`geovae.objects`; ``"parcel,field"`` as typed on a command line), written
            as ``<stem>.objects.<format>`` besides the class polygons, with the
            ``<stem>.object-probability.tif`` raster they are split with; None for none.
        object_halo: pixels around each block the object split sees; objects up to this
            size are exact (larger ones are reported).
        object_seed: interior probability (with a model's object heads: its distance to the
            object's outline, 0..1) at which a pixel seeds an object; None for the
            value the model learnt on its held-out part (``extra.objects.seed``), else 0.5.
        object_min_area: objects smaller than this (m^2; pixels in pixel coordinates) are
            dropped; None for the minimum the model learnt (``extra.objects.min_area_px``),
            else none. ``min_area`` applies to objects as well.
        bands: the scene's bands the model reads, in its order: 1-based band numbers of the
            file (``"4,3,2,8"`` as typed on a command line; a band may repeat); only those
            bands are read. None for every data band in file order.
    """

    tile: int | None = field(
        default=None,
        metadata=_cli(
            "Tile size in pixels [default: the size that predicts the fewest pixels for this scene, "
            "up to 768, given the overlap].",
            kind="int",
            low=1,
        ),
    )
    overlap: int | None = field(
        default=None,
        metadata=_cli(
            "Overlap between tiles in pixels [default: twice the model's halo + 16, so tile seams "
            "cannot show; tile/4 for a model whose halo is unknown].",
            kind="int",
            low=0,
        ),
    )
    batch_size: int | None = field(
        default=None,
        metadata=_cli(
            "Tiles per batch [default: about half a megapixel of tiles: 8 of 256², 1 of 1024²]. "
            "On a CPU a larger batch still goes through the model half a megapixel at a time "
            "(as fast, less memory); on a GPU it runs whole.",
            kind="int",
            low=1,
        ),
    )
    device: str = field(default="auto", metadata=_cli("auto, cpu, cuda or cuda:N.", show_default=True))
    precision: Precision | None = field(
        default=None,
        metadata=_cli(
            "auto: bf16/fp16 on CUDA, fp32 on CPU; bf16 is also fast on CPUs with AVX-512 BF16/AMX.",
            kind="choice",
            choices=PRECISIONS,
            cli_default="auto",
            show_default=True,
        ),
    )
    backend: Backend = field(
        default="auto",
        metadata=_cli(
            "What runs the model: auto (onnxruntime for a .onnx file, torch for every other model), "
            "torch, or onnxruntime (a torch model is exported to ONNX in memory first; "
            "geovae export --onnx writes it once). onnxruntime needs pip install geovae[onnx].",
            kind="choice",
            choices=BACKENDS,
            show_default=True,
        ),
    )
    samples: int = field(
        default=0,
        metadata=_cli(
            "Latent samples per tile; > 0 writes the uncertainty raster.", kind="int", low=0, show_default=True
        ),
    )
    reconstruction: bool | None = field(
        default=None,
        metadata=_cli(
            "Write the reconstruction-error (anomaly) raster [default: when the model records its "
            "training error, so unfamiliar pixels are flagged].",
            kind="switch",
        ),
    )
    tta: bool = field(
        default=False, metadata=_cli("Flip test-time augmentation (3 passes: about 3x the model time).", kind="flag")
    )
    min_area: float = field(
        default=0.0,
        metadata=_cli(
            "Drop polygons smaller than this, in m^2 (pixels with --pixel-coords).",
            kind="float",
            low=0,
            show_default=True,
        ),
    )
    simplify: float = field(
        default=0.0,
        metadata=_cli(
            "Topology-preserving simplification tolerance, in metres (pixels with --pixel-coords).",
            kind="float",
            low=0,
            show_default=True,
        ),
    )
    formats: tuple[PolygonFormat, ...] | None = field(
        default=None,
        metadata=_cli(
            "Polygon formats, comma-separated: geojson,gpkg,parquet [default: geojson; gpkg with --pixel-coords].",
            kind="formats",
        ),
    )
    pixel_coords: bool = field(
        default=False, metadata=_cli("Accept an image without CRS; outputs in pixel coordinates.", kind="flag")
    )
    nodata: float | None = field(
        default=None, metadata=_cli("Treat this pixel value as nodata (overrides the file's tag).", kind="float")
    )
    block_size: int = field(
        default=1024,
        metadata=_cli(
            "Output block size in pixels (memory grows with it, not with the scene).",
            kind="int",
            low=64,
            show_default=True,
        ),
    )
    quicklook: bool = field(default=True, metadata=_cli("Skip the PNG quicklook.", kind="flag", flag="--no-quicklook"))
    progress: bool = True
    force: bool = field(
        default=False,
        metadata=_cli(
            "Segment a scene even when it lies far outside the model's training data (another "
            "sensor or scale); it is then flagged.",
            kind="flag",
        ),
    )
    objects: tuple[str, ...] | None = field(
        default=None,
        metadata=_cli(
            "Also write one polygon per object of these classes (names or ids, comma-separated) "
            "as <stem>.objects.<format>, split along the model's boundary class (train it with "
            "--boundary-width)."
        ),
    )
    object_halo: int = field(
        default=256,
        metadata=_cli(
            "Pixels around each block the object split sees; objects up to this size are exact.",
            kind="int",
            low=0,
            show_default=True,
        ),
    )
    object_seed: float | None = field(
        default=None,
        metadata=_cli(
            "Interior probability (with a model's object heads: distance to the object's outline, "
            "0..1) at which a pixel seeds an object [default: the value the model "
            "learnt on its held-out part, else 0.5].",
            kind="float",
            low=0,
            high=1,
            low_open=True,
        ),
    )
    object_min_area: float | None = field(
        default=None,
        metadata=_cli(
            "Drop objects smaller than this, in m^2 (pixels with --pixel-coords) [default: the "
            "minimum the model learnt on its held-out part, else none]; --min-area applies too.",
            kind="float",
            low=0,
        ),
    )
    bands: tuple[int, ...] | None = field(
        default=None,
        metadata=_cli(
            "The scene's bands the model reads, in its order: band numbers of the file, "
            "comma-separated (e.g. 4,3,2,8; a band may repeat). Only those are read [default: every band]."
        ),
    )

    def __post_init__(self) -> None:
        def integer(name: str, lo: int, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < lo:
                flag = name.replace("_", "-")
                raise OptionError(f"--{flag} {v}: must be a whole number of at least {lo}")
            object.__setattr__(self, name, int(v))

        integer("tile", 1, allow_none=True)
        integer("overlap", 0, allow_none=True)
        integer("batch_size", 1, allow_none=True)
        integer("samples", 0)
        integer("block_size", 1)
        for name in ("min_area", "simplify"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise OptionError(f"--{name.replace('_', '-')} {v}: must be a number of 0 or more")
            object.__setattr__(self, name, float(v))
        integer("object_halo", 0)
        seed = self.object_seed
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, float)) or not 0.0 < seed <= 1.0:
                raise OptionError(f"--object-seed {seed}: must be a probability in (0, 1]")
            object.__setattr__(self, "object_seed", float(seed))
        least = self.object_min_area
        if least is not None:
            if isinstance(least, bool) or not isinstance(least, (int, float)) or not math.isfinite(least) or least < 0:
                raise OptionError(f"--object-min-area {least}: must be a number of 0 or more")
            object.__setattr__(self, "object_min_area", float(least))
        if self.objects is not None:
            objs = self.objects
            if isinstance(objs, (str, int)):  # "parcel,field" as typed on a command line
                objs = str(objs).split(",")
            norm = tuple(dict.fromkeys(str(o).strip() for o in objs if str(o).strip()))
            if not norm:
                raise OptionError("--objects: name at least one class (a name or id of the model's classes)")
            object.__setattr__(self, "objects", norm)
        if self.bands is not None:
            object.__setattr__(self, "bands", _band_numbers(self.bands))
        if self.backend not in BACKENDS:
            raise OptionError(f"--backend {self.backend}: use one of {', '.join(BACKENDS)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise OptionError(f"--precision {self.precision}: use one of {', '.join(PRECISIONS)}")
        if self.nodata is not None:
            object.__setattr__(self, "nodata", float(self.nodata))
        if self.formats is not None:
            fmts = self.formats
            if isinstance(fmts, str):  # "geojson,gpkg" as typed on a command line
                fmts = [f for f in fmts.split(",") if f.strip()]
            object.__setattr__(self, "formats", tuple(dict.fromkeys(polygon_format(f) for f in fmts)))

    @classmethod
    def from_kwargs(cls, options: SegmentOptions | None = None, **kwargs: Any) -> SegmentOptions:
        """``options`` (or the defaults) with ``kwargs`` replaced; unknown names are refused.

        Raises:
            OptionError: an unknown option or a value out of range.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OptionError(f"unknown segment option(s) {', '.join(unknown)}; see `geovae segment --help`")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base

    def replace(self, **kwargs: Any) -> SegmentOptions:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-friendly."""
        d = dataclasses.asdict(self)
        for key in ("formats", "objects", "bands"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    def fingerprint(self) -> dict[str, Any]:
        """The options that change what is written (not :data:`SPEED_ONLY`), for resume."""
        fp = {k: v for k, v in sorted(self.to_dict().items()) if k not in SPEED_ONLY}
        if fp["objects"] is None:
            # Without --objects the object options change nothing: leave them out, so markers
            # written before they existed still match.
            for k in ("objects", "object_halo", "object_seed", "object_min_area"):
                fp.pop(k)
        elif fp["object_min_area"] is None:  # as markers written before --object-min-area existed
            fp.pop("object_min_area")
        if fp["bands"] is None:  # every band, as markers written before --bands existed
            fp.pop("bands")
        return fp


def _band_numbers(value: Any) -> tuple[int, ...]:
    """``--bands``: "4,3,2,8" or a sequence of band numbers, each a whole number >= 1."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    out: list[int] = []
    for item in items:
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, (int, float)) or item != int(item) or item < 1:
            raise OptionError(f"--bands {value!r}: give band numbers of the file (1 is the first), e.g. 4,3,2,8")
        out.append(int(item))
    if not out:
        raise OptionError("--bands: name at least one band number, e.g. 4,3,2,8")
    return tuple(out)
