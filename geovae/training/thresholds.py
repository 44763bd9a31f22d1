"""Object settings learnt, not guessed: the seed threshold and the minimum object size.

``geovae segment --objects`` cuts objects with a seed threshold and drops objects below a
minimum size (:mod:`geovae.objects`). Which values work depends on the model and the data,
so training with object labels (object polygons with ``--boundary-width``, or a label raster
with a class named ``boundary``) chooses them on the part of the labelled area it held out
for validation (the spatial split of
:func:`~geovae.training.samplers.split_regions`, never random pixels, so the choice is
judged on objects the model did not train on):

1. The trained model segments the held-out window (at most :data:`MAX_HELDOUT_SIDE` pixels
   a side, the middle of the held-out part) through :func:`geovae.segment.segment_scene`
   with ``--objects``: its class and object-probability rasters.
2. For every seed threshold of :data:`SEED_CANDIDATES` the objects are cut by
   :func:`geovae.vector.vectorize_objects` (the same path as ``segment --objects``); for
   every minimum size of :data:`MIN_AREA_CANDIDATES_PX` the smaller objects are dropped (on
   their pixel-exact area, as ``--min-area`` does).
3. Each candidate is scored against the labels' objects clipped to the window (the object
   polygons; from a label raster, the objects ``vectorize_objects`` makes of the labels) by
   :func:`geovae.metrics.object_scores` (F1 at IoU 0.5, one to one); the best F1 wins, ties
   going to the seed nearest the default and then to the smaller minimum.

The chosen values, the F1 they reached, the F1 of the defaults and the window go into the
model file's ``extra.objects`` (``seed``, ``min_area_px``, ``f1_heldout``, ``f1_default``,
``heldout``), where :func:`geovae.objects.learnt_settings` finds them.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geovae.errors import GeovaeError
from geovae.objects import DEFAULT_SEED, pixel_area

__all__ = [
    "MAX_HELDOUT_SIDE",
    "MIN_AREA_CANDIDATES_PX",
    "SEED_CANDIDATES",
    "choose_object_settings",
    "heldout_object_settings",
    "heldout_window",
    "learn_object_settings",
    "raster_object_classes",
]

log = logging.getLogger("geovae.training")

#: Seed thresholds tried (interior minus boundary probability); the default is one of them.
SEED_CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: Minimum object sizes tried, in pixels; 0 (keep every object) is the default.
MIN_AREA_CANDIDATES_PX = (0, 4, 8, 16, 32, 64)
#: The held-out window is at most this many pixels a side (the middle of the held-out part),
#: which bounds the time and memory of the choice whatever the scene's size.
MAX_HELDOUT_SIDE = 2048


def choose_object_settings(
    classes: str | os.PathLike[str],
    probabilities: str | os.PathLike[str] | None,
    reference: Any,
    objects: Sequence[str | int],
    *,
    region: Any = None,
    seeds: Sequence[float] = SEED_CANDIDATES,
    min_areas_px: Sequence[float] = MIN_AREA_CANDIDATES_PX,
) -> dict[str, Any]:
    """The seed threshold and minimum object size with the best object F1@0.5 on a window.

    Args:
        classes: a class raster (a run's ``<stem>.classes.tif``).
        probabilities: its ``<stem>.object-probability.tif``, or None (seeds from the
            class raster: the seed threshold then changes nothing).
        reference: the reference object polygons (a GeoDataFrame or file).
        objects: the object classes (names or ids).
        region: the area both sets are clipped to, ``(left, bottom, right, top)`` in the
            reference's CRS; None for the class raster's bounds.
        seeds: seed thresholds to try, each in (0, 1].
        min_areas_px: minimum object sizes to try, in pixels.

    Returns:
        ``{"seed", "min_area_px", "f1_heldout", "precision", "recall", "f1_default",
        "reference_objects", "scores"}``: the chosen values, their scores, the F1 of the
        defaults (seed 0.5, no minimum; None when they are not among the candidates), the
        reference objects in the region, and ``[seed, min_area_px, f1]`` of every candidate.

    Raises:
        OptionError, SceneError, LabelsError: unreadable rasters or polygons.
    """
    from geovae.metrics import object_scores
    from geovae.products import area_column
    from geovae.scene import open_raster
    from geovae.vector import vectorize_objects

    with open_raster(classes, "class raster") as src:
        one_pixel = pixel_area(src.crs, src.transform)
        area_col = area_column(src.crs is None)
        bounds = tuple(src.bounds)
    box = region if region is not None else bounds
    rows: list[tuple[float, float, dict[str, Any]]] = []
    for seed in seeds:
        gdf = vectorize_objects(classes, None, objects=list(objects), probabilities=probabilities, seed=float(seed))
        for least in min_areas_px:
            kept = gdf[gdf[area_col] >= float(least) * one_pixel] if least > 0 else gdf
            rows.append((float(seed), float(least), object_scores(kept, reference, region=box)))

    def f1(score: dict[str, Any]) -> float:
        return float(score["f1"]) if score.get("f1") is not None else 0.0

    seed, least, best = min(rows, key=lambda r: (-round(f1(r[2]), 9), abs(r[0] - DEFAULT_SEED), r[1]))
    default = next((f1(s) for a, b, s in rows if math.isclose(a, DEFAULT_SEED) and b == 0), None)
    return {
        "seed": seed,
        "min_area_px": least,
        "f1_heldout": round(f1(best), 4),
        "precision": best.get("precision"),
        "recall": best.get("recall"),
        "f1_default": None if default is None else round(default, 4),
        "reference_objects": int(best.get("reference") or 0),
        "scores": [[a, b, round(f1(s), 4)] for a, b, s in rows],
    }


def heldout_window(dm: Any, max_side: int = MAX_HELDOUT_SIDE) -> Window | None:
    """The pixel window of the held-out part the settings are chosen on, or None.

    The held-out (validation) part of a :class:`~geovae.training.SceneDataModule`, cut to
    its middle ``max_side`` pixels a side.
    """
    if dm.val_box is None:
        return None
    left, bottom, right, top = dm.val_box
    inv = ~dm.facts.transform
    c0, r0 = (round(v) for v in inv @ (left, top))
    c1, r1 = (round(v) for v in inv @ (right, bottom))
    w, h = c1 - c0, r1 - r0
    cw, ch = min(w, max_side), min(h, max_side)
    return Window(c0 + (w - cw) // 2, r0 + (h - ch) // 2, cw, ch)


def raster_object_classes(dm: Any) -> tuple[int | None, list[int]]:
    """The boundary class and object classes of training from a label raster: a class named
    ``boundary`` makes it object labels; every other class but one named ``background`` is an
    object class. ``(None, [])`` for vector labels or a label raster without a boundary class."""
    from geovae.objects import BACKGROUND_NAME, BOUNDARY_NAME

    if not getattr(dm, "labels_path", None):
        return None, []
    named = {str(n).strip().lower(): int(c) for c, n in zip(dm.classes.ids, dm.classes.names, strict=True)}
    boundary = named.get(BOUNDARY_NAME)
    if boundary is None:
        return None, []
    skip = {boundary, named.get(BACKGROUND_NAME)}
    return boundary, [int(c) for c in dm.classes.ids if c not in skip]


def _raster_reference(dm: Any, window: Window, folder: Path, objects: Sequence[int]) -> Any:
    """The reference objects of a label raster with a boundary class in ``window``: the
    objects :func:`~geovae.vector.vectorize_objects` makes of the labels themselves (seeds
    from the class pixels, the boundary given back to them), as a GeoDataFrame."""
    from geovae.vector import vectorize_objects

    labels = folder / "labels.tif"
    _crop(dm.labels_path, window, labels, classes=dm.classes)
    return vectorize_objects(labels, None, objects=[str(c) for c in objects])


def _crop(image: str, window: Window, out: Path, classes: Any = None) -> None:
    """Copy ``window`` of ``image`` to a GeoTIFF (strip by strip: memory is one strip); with
    ``classes`` (a :class:`~geovae.classes.ClassSpec`), a label raster with its class table."""
    from geovae.products import write_class_table
    from geovae.scene import open_raster

    with open_raster(image, "labels" if classes is not None else "image") as src:
        profile = {
            "driver": "GTiff",
            "width": int(window.width),
            "height": int(window.height),
            "count": src.count,
            "dtype": src.dtypes[0],
            "crs": src.crs,
            "transform": window_transform(window, src.transform),
            "nodata": src.nodata,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
        }
        with rasterio.open(out, "w", **profile) as dst:
            dst.colorinterp = src.colorinterp
            for i, d in enumerate(src.descriptions, 1):
                if d:
                    dst.set_band_description(i, d)
            for top in range(0, int(window.height), 256):
                h = min(256, int(window.height) - top)
                win = Window(window.col_off, window.row_off + top, window.width, h)
                dst.write(src.read(window=win), window=Window(0, top, window.width, h))
            if classes is not None:
                write_class_table(dst, classes.ids, classes.names, classes.colors)


def heldout_object_settings(module: Any, info: Any, dm: Any, *, device: str = "cpu") -> dict[str, Any] | None:
    """Choose the seed threshold and minimum object size on the held-out part of training.

    Args:
        module: the trained model (not changed: a copy predicts).
        info: its description (with the data module's ``extra.objects``).
        dm: the :class:`~geovae.training.SceneDataModule` it was trained with: object
            polygons (``boundary_width``), or a label raster with a class named ``boundary``
            (its objects are the ones the labels make, :func:`raster_object_classes`).
        device: where the copy predicts.

    Returns:
        What :func:`choose_object_settings` returns, plus ``heldout`` (``box``: the window's
        bounds in the image's CRS, ``window``: ``[col, row, width, height]`` in the image);
        None without object labels or a held-out part, or with no labelled object in it (a
        warning says so).
    """
    import shapely

    from geovae.model.base import SegmentationModel
    from geovae.segment import SegmentOptions, segment_scene

    boundary, raster_objects = raster_object_classes(dm)
    window = heldout_window(dm)
    if window is None or not (dm.objects or boundary is not None):
        return None
    tf = window_transform(window, dm.facts.transform)
    left, top = tf @ (0, 0)
    right, bottom = tf @ (window.width, window.height)
    box = (min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    object_ids = list(dm.objects["object_classes"]) if dm.objects else raster_objects
    ids = [str(c) for c in object_ids]
    with tempfile.TemporaryDirectory(prefix="geovae-heldout-") as tmp:
        if dm.objects:
            reference = dm.object_reference()
            inside = reference[reference.intersects(shapely.box(*box))]
        else:
            inside = _raster_reference(dm, window, Path(tmp), object_ids)
        if inside.empty:
            log.warning(
                "no labelled object in the held-out part; geovae segment --objects will use the default seed "
                "and minimum object size"
            )
            return None
        model = SegmentationModel(copy.deepcopy(module), info, device, amp=False)
        crop = Path(tmp) / "heldout.tif"
        _crop(dm.image_path, window, crop)
        res = segment_scene(
            str(crop),
            model,
            Path(tmp) / "run",
            SegmentOptions(
                objects=tuple(ids),
                object_seed=DEFAULT_SEED,
                formats=("gpkg",),
                quicklook=False,
                reconstruction=False,
                progress=False,
            ),
        )
        chosen = choose_object_settings(
            res.outputs["classes"], res.outputs.get("object_probability"), inside, ids, region=box
        )
    chosen["heldout"] = {
        "box": [float(v) for v in box],
        "window": [int(window.col_off), int(window.row_off), int(window.width), int(window.height)],
    }
    return chosen


def learn_object_settings(module: Any, info: Any, dm: Any, *, device: str = "cpu") -> None:
    """Record the settings :func:`heldout_object_settings` chooses in ``info.extra["objects"]``.

    A failure to choose (a held-out part the run cannot segment) leaves the model without
    them, with a warning: ``segment --objects`` then uses the defaults.
    """
    try:
        chosen = heldout_object_settings(module, info, dm, device=device)
    except GeovaeError as e:
        log.warning("could not choose the object settings on the held-out part (%s); the defaults stay", e)
        return
    if chosen is None:
        return
    keep = ("seed", "min_area_px", "f1_heldout", "f1_default", "reference_objects", "heldout")
    info.extra.setdefault("objects", {}).update({k: chosen[k] for k in keep})
    log.info(
        "objects: seed %.2f and minimum object %g px chosen on the held-out part (object F1@0.5 %.3f over %d "
        "objects; the defaults reach %s)",
        chosen["seed"],
        chosen["min_area_px"],
        chosen["f1_heldout"],
        chosen["reference_objects"],
        "-" if chosen["f1_default"] is None else f"{chosen['f1_default']:.3f}",
    )
