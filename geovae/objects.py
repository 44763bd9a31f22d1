"""Objects: one polygon per object (a field, a parcel, a building), not per class region.

Class-region polygons join every touching pixel of one class, which is what land cover
wants and what parcels, fields, buildings or tree crowns do not: two fields that share an
edge come out as one polygon. A model trained with a *boundary* class
(``geovae train --boundary-width``) predicts, besides each object class, where objects meet;
this module turns that into objects:

1. **Seeds** from the distance map of a model with object heads (field delineation as in
   ResUNet-a: the pixels of object class ``c`` whose predicted distance to their object's
   outline, normalised per object to 0..1, is at least ``seed``), else from the interior
   probability: the pixels of object class ``c`` whose
   probability of ``c`` minus that of the boundary class is at least ``seed``, without
   their narrow necks (the pixels at least :data:`SEED_DISTANCE` from the seed's edge; a
   seed too thin for that stays whole), in 4-connected pieces; pieces smaller than
   :data:`MIN_SEED_PIXELS` are left out (they come from pinched interiors and would cut one
   object into several). Without probabilities (a class raster only), the pixels of class
   ``c``, necks cut the same way.
2. A **watershed** (``skimage.segmentation.watershed``, 4-connected) floods the object
   area, the pixels of the object classes and of the boundary class, from the seeds over
   the boundary probability (without a boundary class: one minus the object classes'
   probability; without probabilities: minus the distance to the nearest other pixel). Two
   objects that a broken or weak boundary joins still meet along its ridge, and every
   boundary pixel reached goes back to an object, so objects tile the area. A piece of the
   object area that holds no seed (too small, or all boundary) becomes one object of its own
   when it holds object-class pixels, and is left out when it is boundary only.
3. Each object is then one polygon, with its class (the class of its seed), area, mean
   confidence and ``score``, the mean probability of its class over its pixels
   (:mod:`geovae.vector.objects`, block-wise with a halo around each block).

This module decides which pixels make which object in one window (:func:`label_objects`)
and what the objects of a run are (:class:`ObjectSpec`, :func:`plan_objects`). The flooding
order does not depend on where the window lies: equal elevations (a plateau, such as a
saturated boundary) are ordered by the distance to the nearest seed, so a plateau is split
half way between the seeds, then by a fixed function of the pixel's scene position. (The
watershed's own tie-break, first in first out, depends on everything the window holds: two
block sizes would give objects that differ by a few pixels.) So every window that holds an
object's neighbourhood gives it the same pixels and the same name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from geovae.errors import ModelMismatchError, OptionError

log = logging.getLogger("geovae.objects")

__all__ = [
    "BACKGROUND_NAME",
    "BOUNDARY_NAME",
    "DEFAULT_HALO",
    "DEFAULT_SEED",
    "MIN_SEED_PIXELS",
    "OBJECT_MAPS",
    "SEED_DISTANCE",
    "ObjectSpec",
    "boundary_class",
    "label_objects",
    "learnt_settings",
    "map_bands",
    "pixel_area",
    "plan_objects",
    "probability_bands",
    "probability_tags",
    "resolve_object_classes",
    "stitch_channels",
]

#: Seeds of fewer pixels are left out. Measured on the Amsterdam parcels rasterised with a
#: 1-pixel boundary (a perfect prediction): 1 px gives object F1 0.80 (interiors pinched by
#: the boundary split an object into several), 2 px 0.86, 3 px 0.88, 5 px 0.89, 8 px 0.89.
MIN_SEED_PIXELS = 4
#: Seeds keep only their pixels at least this far (pixels, Euclidean) from the seed's edge,
#: which cuts necks of up to 2-3 pixels (a broken boundary); a seed too thin for that stays
#: whole. On the Amsterdam parcels predicted by a trained model it raised object F1 from
#: 0.19 to 0.28 (seeds at interior probability 0.5) and from 0.32 to 0.33 (interior minus
#: boundary 0.65).
SEED_DISTANCE = 2.0
#: Default halo in pixels: objects up to this size (in rows and columns) are exact.
DEFAULT_HALO = 256
#: Default seed threshold on the interior probability.
DEFAULT_SEED = 0.5
#: The name training gives the boundary class, and the background class.
BOUNDARY_NAME = "boundary"
BACKGROUND_NAME = "background"
#: The object maps of a model with object heads, in the order the model gives them and the
#: object-probability raster holds them after the probabilities: the object extent and the
#: distance to the object's outline, both in 0..1.
OBJECT_MAPS = ("extent", "distance")


@dataclass(frozen=True)
class ObjectSpec:
    """What makes objects: which classes, the boundary class, the seed rule and the halo.

    Attributes:
        classes: class ids turned into objects (in the class raster).
        names: their names, for the polygons' ``class_name``.
        boundary: class id of the boundary class, or None.
        seed: seeds are the pixels whose distance to their object's outline (``distance``), else
            whose interior probability minus boundary probability, is
            at least this (0..1).
        halo: pixels added on every side of a block; objects up to this size are exact.
        distance: seeds from the distance map (a model with object heads: the last band of
            the probabilities :func:`label_objects` gets) instead of the interior probability.
        min_seed: seeds of fewer pixels are left out.
        min_pixels: objects of fewer pixels are left out (a model's learnt minimum).
        min_area: objects smaller than this (m^2, or square pixels without a CRS) are left
            out; None to use ``min_pixels``. A run's ``--min-area`` applies as well.
        origin: where each setting came from, ``(("seed", "model"), ...)``: ``"option"``
            (given by the user), ``"model"`` (learnt in training) or ``"default"``.
    """

    classes: tuple[int, ...]
    names: tuple[str, ...] = ()
    boundary: int | None = None
    seed: float = DEFAULT_SEED
    halo: int = DEFAULT_HALO
    min_seed: int = MIN_SEED_PIXELS
    min_pixels: float = 0.0
    min_area: float | None = None
    origin: tuple[tuple[str, str], ...] = ()
    distance: bool = False

    @property
    def maps(self) -> tuple[str, ...]:
        """The object maps a run predicts and blends for these objects (:data:`OBJECT_MAPS`
        with ``distance``, else none)."""
        return OBJECT_MAPS if self.distance else ()

    def min_object_area(self, run_min_area: float, pixel_area: float) -> float:
        """The smallest object area a run keeps (its units: m^2, or square pixels).

        Args:
            run_min_area: the run's ``--min-area``, which objects obey too.
            pixel_area: the area of one pixel in the same units.
        """
        own = self.min_area if self.min_area is not None else self.min_pixels * pixel_area
        return max(float(run_min_area), float(own))

    def __post_init__(self) -> None:
        if not self.classes:
            raise OptionError("--objects: name at least one class")
        if self.boundary is not None and self.boundary in self.classes:
            raise OptionError(f"--objects: class {self.boundary} is the boundary class; name the object classes")
        if not 0.0 < float(self.seed) <= 1.0:
            raise OptionError(f"--object-seed {self.seed}: must be a probability in (0, 1]")
        if not isinstance(self.halo, int) or self.halo < 0:
            raise OptionError(f"--object-halo {self.halo}: must be a whole number of pixels >= 0")
        for name, v in (("--object-min-area", self.min_area), ("min_pixels", self.min_pixels)):
            if v is not None and not (np.isfinite(v) and v >= 0):
                raise OptionError(f"{name} {v}: must be a number of 0 or more")


def boundary_class(info: Any) -> int | None:
    """The boundary class id of a model, or None.

    Read from the model file's ``extra.objects.boundary_class`` (written by ``geovae train
    --boundary-width``), else its training data description, else a class named
    ``boundary``.

    Args:
        info: a :class:`~geovae.model.base.ModelInfo`.
    """
    extra = getattr(info, "extra", None) or {}
    for where in (
        extra.get("objects"),
        (extra.get("data") or {}).get("objects") if isinstance(extra.get("data"), dict) else None,
    ):
        if (
            isinstance(where, dict)
            and isinstance(where.get("boundary_class"), int)
            and where["boundary_class"] in info.class_ids
        ):
            return int(where["boundary_class"])
    for cid, name in zip(info.class_ids, info.class_names):
        if str(name).strip().lower() == BOUNDARY_NAME:
            return int(cid)
    return None


def pixel_area(crs: Any, transform: Any) -> float:
    """The area of one pixel in the units object areas are measured in: the transform's
    (m^2 in a projected CRS), or 1 without a CRS (areas in square pixels)."""
    return 1.0 if crs is None else abs(float(transform.determinant))


def learnt_settings(info: Any) -> dict[str, Any]:
    """The object settings a model learnt on its held-out part, or ``{}``.

    ``geovae train`` with object labels chooses the seed threshold and the minimum object
    size by object F1 on the part of the labelled area it held out
    (:mod:`geovae.training.thresholds`) and records them in ``extra.objects``: ``seed``,
    ``min_area_px``, ``f1_heldout`` (and ``f1_default``, ``heldout``). A value that is
    missing or out of range is not used.

    Args:
        info: a :class:`~geovae.model.base.ModelInfo`.

    Returns:
        ``{"seed", "min_area_px", "f1_heldout"}``, the keys the model file has.
    """
    extra = getattr(info, "extra", None) or {}
    where = extra.get("objects")
    if not isinstance(where, dict):
        return {}
    out: dict[str, Any] = {}
    seed, area, f1 = where.get("seed"), where.get("min_area_px"), where.get("f1_heldout")
    if isinstance(seed, (int, float)) and not isinstance(seed, bool) and 0.0 < float(seed) <= 1.0:
        out["seed"] = float(seed)
    if isinstance(area, (int, float)) and not isinstance(area, bool) and np.isfinite(area) and area >= 0:
        out["min_area_px"] = float(area)
    if out and isinstance(f1, (int, float)) and not isinstance(f1, bool):
        out["f1_heldout"] = float(f1)
    return out


def resolve_object_classes(
    wanted: Sequence[str | int], class_ids: Sequence[int], class_names: Sequence[str], boundary: int | None
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Class ids and names of ``--objects`` entries, each a class name or id.

    Raises:
        ModelMismatchError: a name or id that is no class of the model, or the boundary class.
    """
    by_name = {str(n).strip().lower(): int(c) for c, n in zip(class_ids, class_names)}
    names = dict(zip((int(c) for c in class_ids), (str(n) for n in class_names)))
    out: list[int] = []
    for w in wanted:
        key = str(w).strip()
        if key.lower() in by_name:
            cid = by_name[key.lower()]
        elif key.lstrip("-").isdigit() and int(key) in names:
            cid = int(key)
        else:
            listed = ", ".join(f"{c}:{n}" for c, n in names.items())
            raise ModelMismatchError(f"--objects {key}: no such class (the classes are {listed}); name object classes")
        if cid == boundary:
            raise ModelMismatchError(
                f"--objects {key}: that is the boundary class; name the classes whose objects it separates"
            )
        if cid not in out:
            out.append(cid)
    return tuple(out), tuple(names[c] for c in out)


# ----------------------------------------------------------------------------- one window
def _cut_necks(core: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """Seeds without their narrow necks: the pixels at least :data:`SEED_DISTANCE` from the
    seed's edge, so two interiors that a broken boundary joins by a neck of a pixel or two
    seed two objects; a piece too thin to hold such pixels (a narrow field) stays whole."""
    from scipy import ndimage as ndi

    if not core.any():
        return core
    deep = ndi.distance_transform_edt(core) >= SEED_DISTANCE
    pieces, n = ndi.label(core, structure=cross)
    has_deep = np.zeros(n + 1, bool)
    has_deep[pieces[deep]] = True
    return deep | (core & ~has_deep[pieces])


def _position_hash(shape: tuple[int, int], row_off: int, col_off: int, width: int) -> np.ndarray:
    """A fixed value in [0, 1) per scene pixel (Fibonacci hashing of its index)."""
    r = np.arange(row_off, row_off + shape[0], dtype=np.uint64)[:, None]
    c = np.arange(col_off, col_off + shape[1], dtype=np.uint64)[None, :]
    h = ((r * np.uint64(width) + c) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return h.astype(np.float64) / float(1 << 24)


def label_objects(
    classes: np.ndarray,
    valid: np.ndarray,
    spec: ObjectSpec,
    probabilities: np.ndarray | None = None,
    *,
    offset: tuple[int, int] = (0, 0),
    width: int | None = None,
    open_edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objects of one window: seeds, watershed, labels.

    Args:
        classes: (h, w) class ids.
        valid: (h, w) bool, False at nodata.
        spec: the classes, boundary class and seed rule.
        probabilities: (n + 1, h, w) float: the probability of each of ``spec.classes``, then
            of the boundary class (a band that is ignored without a boundary class), then
            with ``spec.distance`` the distance map; None to work from the class raster alone.
        offset: (row, column) of the window in the scene (for object names and tie-breaks).
        width: the scene's width (default the window's).
        open_edges: (top, bottom, left, right): whether the scene continues past that edge
            of the window. A seedless piece of the object area that reaches an open edge is
            not made an object here (its seed may lie beyond).

    Returns:
        ``(labels, anchors, label_class)``: (h, w) int32 labels, 0 outside every object;
        for label ``i`` (1-based), ``anchors[i - 1]`` is the scene index (row * width +
        column) of the first pixel of its seed in raster order, ``label_class[i - 1]`` its
        class id.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    h, w = classes.shape
    W = int(width if width is not None else w)
    r0, c0 = offset
    cross = ndi.generate_binary_structure(2, 1)
    is_obj = np.zeros((h, w), bool)
    for c in spec.classes:
        is_obj |= classes == c
    is_obj &= valid
    area = is_obj | ((classes == spec.boundary) & valid) if spec.boundary is not None else is_obj
    empty = (np.zeros((h, w), np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not area.any():
        return empty

    seeds = np.zeros((h, w), np.int32)
    seed_class: list[int] = []
    n = 0
    for k, c in enumerate(spec.classes):
        mine = (classes == c) & valid
        if not mine.any():
            continue
        if probabilities is not None and spec.distance:
            core = mine & (probabilities[len(spec.classes) + 1] >= spec.seed)
        elif probabilities is not None:
            # Interior minus boundary: a weak boundary (not the most probable class, yet
            # well above the interior's) still cuts a seed in two.
            margin = probabilities[k] - (probabilities[len(spec.classes)] if spec.boundary is not None else 0.0)
            core = mine & (margin >= spec.seed)
        else:
            core = mine
        core = _cut_necks(core, cross)
        lab, m = ndi.label(core, structure=cross)
        if m == 0:
            continue
        sizes = np.bincount(lab.ravel(), minlength=m + 1)
        keep = sizes >= spec.min_seed
        keep[0] = False
        new_id = np.zeros(m + 1, np.int32)
        new_id[keep] = np.arange(n + 1, n + 1 + int(keep.sum()), dtype=np.int32)
        lab = new_id[lab]
        seeds = np.where(lab > 0, lab, seeds)
        seed_class += [c] * int(keep.sum())
        n += int(keep.sum())

    # Pieces of the object area without a seed: their object-class pixels seed them.
    pieces, m = ndi.label(area, structure=cross)
    seeded = np.zeros(m + 1, bool)
    seeded[pieces[seeds > 0]] = True
    has_obj = np.zeros(m + 1, bool)
    has_obj[pieces[is_obj]] = True
    touches = np.zeros(m + 1, bool)
    top, bottom, left, right = open_edges
    for edge, is_open in ((pieces[0, :], top), (pieces[-1, :], bottom), (pieces[:, 0], left), (pieces[:, -1], right)):
        if is_open:
            touches[edge] = True
    orphan = has_obj & ~seeded & ~touches
    orphan[0] = False
    if orphan.any():
        opx = orphan[pieces] & is_obj
        ids = np.zeros(m + 1, np.int32)
        ids[orphan] = np.arange(n + 1, n + 1 + int(orphan.sum()), dtype=np.int32)
        seeds = np.where(opx, ids[pieces], seeds)
        # The class of an orphan object: the object class most of its pixels have.
        opieces = np.flatnonzero(orphan)
        counts = np.stack([np.bincount(pieces[opx & (classes == c)], minlength=m + 1)[opieces] for c in spec.classes])
        seed_class += [spec.classes[i] for i in counts.argmax(0)]
        n += len(opieces)
    if n == 0:
        return empty

    if probabilities is not None:
        if spec.boundary is not None:
            elevation = probabilities[len(spec.classes)].astype(np.float64)
        else:
            elevation = 1.0 - probabilities[: len(spec.classes)].sum(0, dtype=np.float64)
        elevation = np.where(np.isfinite(elevation), elevation, 1.0)
    else:
        elevation = -ndi.distance_transform_edt(is_obj)
    # Ties (a plateau, e.g. a saturated boundary) go to the nearest seed, then by a fixed
    # function of the scene position: both depend on the pixel, not on the window, so the
    # flooding order is the same in every window that holds the object's neighbourhood (the
    # watershed's own tie-break, first in first out, depends on the whole window).
    near = ndi.distance_transform_edt(seeds == 0)
    elevation = elevation + 1e-9 * near + 1e-13 * _position_hash((h, w), r0, c0, W)
    labels = watershed(elevation, seeds, mask=area, connectivity=1).astype(np.int32)

    flat = seeds.ravel()
    first = np.full(n + 1, -1, np.int64)
    nz = np.flatnonzero(flat)
    # np.unique's first index of each seed label = its first pixel in raster order.
    u, idx = np.unique(flat[nz], return_index=True)
    first[u] = nz[idx]
    rows, cols = np.divmod(first[1:], w)
    anchors = (rows + r0) * W + (cols + c0)
    return labels, anchors.astype(np.int64), np.asarray(seed_class, np.int64)


# ----------------------------------------------------------------------------- the raster of probabilities
def probability_tags(
    classes: Sequence[int], names: Sequence[str], boundary: int | None, maps: Sequence[str] = ()
) -> dict[str, str]:
    """Tags of the object-probability raster: which class each band holds, then which object
    map (``OBJECT_MAPS``, the bands after the classes')."""
    import json

    ids = [*classes, *([boundary] if boundary is not None else [])]
    tags = {
        "CLASS_IDS": json.dumps([int(c) for c in ids]),
        "BOUNDARY_CLASS": "" if boundary is None else str(boundary),
        "OBJECT_CLASSES": json.dumps(dict(zip((str(int(c)) for c in classes), (str(n) for n in names)))),
    }
    if maps:
        tags["OBJECT_MAPS"] = json.dumps([str(m) for m in maps])
    return tags


def map_bands(ds: Any) -> dict[str, int]:
    """The band (1-based) of each object map of an object-probability raster (``{}`` without)."""
    import json

    ids, _ = probability_bands(ds)
    try:
        maps = [str(m) for m in json.loads(ds.tags().get("OBJECT_MAPS", "[]"))]
    except (TypeError, ValueError):
        return {}
    out = {m: len(ids) + 1 + i for i, m in enumerate(maps)}
    return {m: b for m, b in out.items() if b <= ds.count}


def probability_bands(ds: Any) -> tuple[list[int], int | None]:
    """The class id of each band of an object-probability raster, and its boundary class."""
    import json

    tags = ds.tags()
    try:
        ids = [int(v) for v in json.loads(tags["CLASS_IDS"])]
    except (KeyError, TypeError, ValueError):
        raise OptionError(
            f"{ds.name} is not an object-probability raster (no CLASS_IDS tag); pass the "
            "<stem>.object-probability.tif a segment run with --objects wrote"
        ) from None
    b = tags.get("BOUNDARY_CLASS", "")
    return ids, int(b) if b.strip().lstrip("-").isdigit() else None


# ----------------------------------------------------------------------------- a segment run
def plan_objects(options: Any, info: Any, formats: Sequence[str], *, object_maps: bool = False) -> ObjectSpec | None:
    """The :class:`ObjectSpec` of a segment run's ``--objects`` options, checked against the model.

    The seed threshold and the minimum object size each come from the option when given
    (``object_seed``, ``object_min_area``), else from the model (:func:`learnt_settings`),
    else from the defaults (0.5, none); ``ObjectSpec.origin`` says which, and the log names
    the model's values when they are used.

    Args:
        options: the run's :class:`~geovae.segment.options.SegmentOptions`.
        info: the model's :class:`~geovae.model.base.ModelInfo`.
        formats: the polygon formats the run writes.
        object_maps: the model predicts object maps (object heads): seeds come from its
            distance map.

    Returns:
        The spec, or None without ``--objects``.

    Raises:
        OptionError: ``--objects`` with no polygon format.
        ModelMismatchError: an object class the model does not have, or its boundary class.
    """
    if not options.objects:
        return None
    if not formats:
        raise OptionError("--objects writes object polygons; give --formats (e.g. gpkg)")
    boundary = boundary_class(info)
    ids, names = resolve_object_classes(options.objects, info.class_ids, info.class_names, boundary)
    learnt = learnt_settings(info)
    given_min_area = getattr(options, "object_min_area", None)
    if options.object_seed is not None:
        seed, seed_from = float(options.object_seed), "option"
    elif "seed" in learnt:
        seed, seed_from = learnt["seed"], "model"
    else:
        seed, seed_from = DEFAULT_SEED, "default"
    if given_min_area is not None:
        area_from = "option"
    elif "min_area_px" in learnt:
        area_from = "model"
    else:
        area_from = "default"
    spec = ObjectSpec(
        classes=ids,
        names=names,
        boundary=boundary,
        seed=seed,
        halo=options.object_halo,
        min_pixels=learnt.get("min_area_px", 0.0) if area_from == "model" else 0.0,
        min_area=given_min_area,
        origin=(("seed", seed_from), ("min_area", area_from)),
        distance=bool(object_maps and boundary is not None),
    )
    if "model" in (seed_from, area_from):
        log.info(
            "objects: seed %.2f (%s), minimum object %s (%s); the model learnt seed %s and %s px "
            "on its held-out part (object F1@0.5 %s)",
            spec.seed,
            seed_from,
            f"{given_min_area:g} (--object-min-area)" if area_from == "option" else f"{spec.min_pixels:g} px",
            area_from,
            learnt.get("seed", "-"),
            learnt.get("min_area_px", "-"),
            f"{learnt['f1_heldout']:.3f}" if "f1_heldout" in learnt else "-",
        )
    return spec


def stitch_channels(spec: ObjectSpec, info: Any) -> tuple[list[int], dict[str, str]]:
    """The model's output channels the object-probability raster holds, and its tags (the
    object maps follow the channels when ``spec.distance``)."""

    index = {int(c): i for i, c in enumerate(info.class_ids)}
    channels = [index[c] for c in spec.classes] + ([index[spec.boundary]] if spec.boundary is not None else [])
    return channels, probability_tags(spec.classes, spec.names, spec.boundary, spec.maps)
