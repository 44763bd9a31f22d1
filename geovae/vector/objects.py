"""Object polygons: one polygon per object (:mod:`geovae.objects`), block-wise.

The raster is processed in blocks as the class-region polygons are, through the same
engine (:func:`~geovae.vector.engine.trace_layer`), each block with a *halo*: the watershed
(:func:`geovae.objects.label_objects`) runs on the block grown by ``halo`` pixels on every
side, and the block keeps the labels of its own pixels only, so every pixel is decided once.
An object is named by the first pixel of its seed in raster order (``object_id = row *
width + column``): every block that sees the whole seed gives the object the same name, so
the pieces of an object in several blocks are joined across block lines exactly as class
regions are, never cut, never duplicated. That holds when every object fits within the halo
(the watershed near a block's edge then sees every seed that competes for a pixel); an
object that reaches the edge of a window is counted and reported
(:attr:`ObjectResult.beyond_halo`, a warning), with the advice to raise the halo. Memory
holds one window of ``(block + 2 * halo)^2`` pixels (a few arrays of it), never the scene.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from geovae.errors import OptionError
from geovae.objects import (
    BOUNDARY_NAME,
    DEFAULT_HALO,
    DEFAULT_SEED,
    ObjectSpec,
    label_objects,
    map_bands,
    probability_bands,
    resolve_object_classes,
)
from geovae.products import OBJECT_COLUMNS, area_column, read_class_table
from geovae.scene import open_raster
from geovae.vector import trace
from geovae.vector.engine import Layer, check_options
from geovae.vector.formats import ColumnType, style_geopackages, write_files
from geovae.vector.rasters import ClassRaster, read_floats
from geovae.vector.regions import scene_layer_name

__all__ = ["ObjectResult", "vectorize_objects", "write_objects"]

log = logging.getLogger("geovae.objects")


@dataclass
class ObjectResult:
    """What :func:`write_objects` wrote.

    Attributes:
        paths: the output files.
        n_objects: objects written (per output).
        class_areas_m2: total object area per class id (square pixels without a CRS).
        area_unit: ``"m2"`` or ``"px"``.
        beyond_halo: objects that reached the edge of their block's window (block + halo):
            they may be cut or named twice; raise the halo above their size.
    """

    paths: list[Any]
    n_objects: int
    class_areas_m2: dict[int, float]
    area_unit: str
    beyond_halo: int = 0


def _object_layer(
    src: rasterio.DatasetReader,
    spec: ObjectSpec,
    prob: tuple[rasterio.DatasetReader, list[int]] | None,
    conf_ds: rasterio.DatasetReader | None,
    names: dict[int, str],
    beyond: set[int],
) -> Layer:
    """The object layer of class raster ``src``: pieces of the objects labelled in each block
    grown by the halo, keyed by object name and class; objects that reach an open edge of
    their window go into ``beyond``.

    Args:
        prob: the object-probability raster and the bands of ``spec``'s classes (then the
            boundary class), or None.
    """
    W, H = src.width, src.height
    halo = spec.halo
    class_index = {c: i for i, c in enumerate(spec.classes)}
    wanted_ids = [*spec.classes, *([spec.boundary] if spec.boundary is not None else [])]

    def pieces(win: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        c0, r0 = int(win.col_off), int(win.row_off)
        c1, r1 = c0 + int(win.width), r0 + int(win.height)
        gc0, gr0, gc1, gr1 = max(0, c0 - halo), max(0, r0 - halo), min(W, c1 + halo), min(H, r1 + halo)
        grown = Window(gc0, gr0, gc1 - gc0, gr1 - gr0)
        # The core must hold an object pixel: otherwise nothing of this block is kept.
        core = src.read(1, window=win)
        core_ok = src.read_masks(1, window=win) > 0
        if not (np.isin(core, wanted_ids) & core_ok).any():
            return None
        cls = src.read(1, window=grown)
        valid = src.read_masks(1, window=grown) > 0
        probs = None
        if prob is not None:
            probs = prob[0].read(prob[1], window=grown).astype(np.float32)
            if spec.boundary is None:
                n = len(spec.classes)
                probs = np.concatenate([probs[:n], np.zeros_like(probs[:1]), probs[n:]])
            valid &= np.isfinite(probs).all(0)
        edges = (gr0 > 0, gr1 < H, gc0 > 0, gc1 < W)
        labels, anchors, label_class = label_objects(
            cls, valid, spec, probs, offset=(gr0, gc0), width=W, open_edges=edges
        )
        inner = labels[r0 - gr0 : r1 - gr0, c0 - gc0 : c1 - gc0]
        present = np.unique(inner)
        present = present[present > 0]
        if len(present) == 0:
            return None
        # Objects kept here that reach an open edge of the window may be cut: count them.
        rim = np.zeros(len(anchors) + 1, bool)
        for is_open, edge in zip(edges, (labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1])):
            if is_open:
                rim[edge] = True
        rim[0] = False
        beyond.update(int(anchors[i - 1]) for i in present if rim[i])
        score = None
        if probs is not None:
            k = np.array([class_index[int(c)] for c in label_class], np.int64)
            kk = np.where(inner > 0, k[np.maximum(inner, 1) - 1], 0)
            score = np.take_along_axis(probs[:, r0 - gr0 : r1 - gr0, c0 - gc0 : c1 - gc0], kk[None], 0)[0]
            score = np.where(inner > 0, score, np.nan).astype(np.float32)
        conf = read_floats(conf_ds, win)
        geoms, local, stats = trace.block_pieces(inner, inner > 0, win, 4, conf, score)
        keys = anchors[local - 1] * 256 + label_class[local - 1]
        return geoms, keys, stats

    area_col = area_column(src.crs is None)

    def attributes(keys: np.ndarray, stats: np.ndarray, area: np.ndarray) -> dict[str, Any]:
        cls = keys & 255
        nan = np.full(len(keys), np.nan)
        return {
            "object_id": keys >> 8,
            "class_id": cls,
            "class_name": [names.get(int(k), f"class {int(k)}") for k in cls],
            area_col: area,
            "confidence_mean": trace.mean(stats[:, 0], stats[:, 1]) if conf_ds is not None else nan,
            "score": trace.mean(stats[:, 2], stats[:, 3]) if prob is not None else nan,
        }

    cols = tuple(area_col if c == "area" else c for c in OBJECT_COLUMNS)
    special: dict[str, ColumnType] = {"object_id": "int64", "class_id": "int32", "class_name": object}
    return Layer(pieces, attributes, cols, {c: special.get(c, "float64") for c in cols})


def write_objects(
    classes: str | os.PathLike[str],
    targets: Sequence[tuple[Path, Path]],
    spec: ObjectSpec,
    *,
    probabilities: str | os.PathLike[str] | None = None,
    confidence: str | os.PathLike[str] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    block_size: int = 1024,
    layer: str = "objects",
    progress: Callable[[int, int], None] | None = None,
) -> ObjectResult:
    """Object polygons of a class raster (and its probabilities) into given files, streaming.

    Args:
        classes: the class raster.
        targets: ``(final path, path to write)`` per output, as
            :func:`~geovae.vector.write_polygons` takes them.
        spec: the object classes, boundary class, seed threshold and halo.
        probabilities: the run's ``<stem>.object-probability.tif`` (one band per class of
            its ``CLASS_IDS`` tag); None to work from the class raster alone.
        confidence: the confidence raster, for ``confidence_mean``.
        min_area: objects smaller than this (m^2, or square pixels) are dropped.
        simplify: topology-preserving simplification tolerance (metres, or pixels).
        block_size: block side in pixels (the window is the block and ``spec.halo`` around it).
        layer: the layer name in a GeoPackage.
        progress: ``progress(done_rows, total_rows)`` after each row of blocks.

    Returns:
        An :class:`ObjectResult`.

    Raises:
        OptionError: a probability raster that lacks a class of ``spec``, on another grid.
        SceneError: an unreadable or non-integer class raster.
    """
    check_options(block_size, 4, min_area, simplify)
    beyond: set[int] = set()
    with ClassRaster(classes, targets) as raster:
        prob = None
        prob_ds = raster.band(probabilities, "object-probability")
        if prob_ds is not None:
            ids, _ = probability_bands(prob_ds)
            want = [*spec.classes, *([spec.boundary] if spec.boundary is not None else [])]
            missing = [c for c in want if c not in ids]
            if missing:
                raise OptionError(
                    f"object-probability raster {prob_ds.name} has no band for class(es) "
                    f"{', '.join(map(str, missing))} (it holds {ids}); segment with those --objects"
                )
            bands = [ids.index(c) + 1 for c in want]
            if spec.distance:
                where = map_bands(prob_ds)
                if "distance" not in where:
                    raise OptionError(
                        f"object-probability raster {prob_ds.name} has no distance band; segment with a model "
                        "that has object heads, or cut objects from the interior probability"
                    )
                bands.append(where["distance"])
            prob = (prob_ds, bands)
        conf_ds = raster.band(confidence, "confidence")
        table = raster.class_table()
        names = {k: v["name"] for k, v in table.items()}
        names.update(dict(zip(spec.classes, spec.names)))
        res = raster.trace(
            _object_layer(raster.src, spec, prob, conf_ds, names, beyond),
            block=block_size,
            min_area=min_area,
            simplify=simplify,
            connectivity=4,
            name=layer,
            progress=progress,
        )
        style_geopackages(targets, layer, table, {c: n for c, n in names.items() if c in spec.classes})
    if beyond:
        log.warning(
            "%d objects reach beyond the %d-pixel object halo and may be cut or split at block lines; "
            "raise --object-halo above the largest object's size in pixels",
            len(beyond),
            spec.halo,
        )
    return ObjectResult(
        paths=res.paths,
        n_objects=res.n_polygons,
        class_areas_m2=res.class_areas_m2,
        area_unit=res.area_unit,
        beyond_halo=len(beyond),
    )


def vectorize_objects(
    classes: str | os.PathLike[str],
    out: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    objects: str | Sequence[str | int],
    probabilities: str | os.PathLike[str] | None = None,
    confidence: str | os.PathLike[str] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    block_size: int = 1024,
    halo: int = DEFAULT_HALO,
    seed: float = DEFAULT_SEED,
    layer: str | None = None,
) -> Any:
    """One polygon per object of ``objects`` classes of a class raster, block-wise.

    The counterpart of :func:`~geovae.vector.vectorize` for objects (see the module
    docstring): seeds, a watershed along the boundary class, one polygon per object with
    ``object_id``, ``class_id``, ``class_name``, ``area_m2`` (``area_px``),
    ``confidence_mean`` and ``score``.

    Args:
        classes: the class raster (``<stem>.classes.tif``).
        out: output path(s) (``.geojson``, ``.gpkg``, ``.parquet``), or None to return a
            GeoDataFrame.
        objects: the object classes, names or ids (a list, or ``"parcel,field"``).
        probabilities: ``<stem>.object-probability.tif`` of a ``segment --objects`` run; its
            tags name its classes and the boundary class; one that holds a distance map (a
            model with object heads) seeds objects from it. None: objects from the class
            raster alone (seeds by distance, split at narrow necks; a class named
            ``boundary`` in the class table is still given back to the objects).
        confidence: a confidence raster on the same grid, for ``confidence_mean``.
        min_area, simplify, block_size: as :func:`~geovae.vector.vectorize`.
        halo: pixels around each block the split sees; objects up to this size are exact.
        seed: interior probability (or, with a distance map, distance to the outline in 0..1)
            at which a pixel seeds an object.
        layer: layer name (default ``<stem>_objects``).

    Returns:
        An :class:`ObjectResult`, or a GeoDataFrame when ``out`` is None.

    Raises:
        OptionError, SceneError, OutputError, ModelMismatchError: as
            :func:`~geovae.vector.vectorize`, and for an object class the raster does not have.
    """
    wanted = [o for o in (objects.split(",") if isinstance(objects, str) else objects) if str(o).strip()]
    with open_raster(classes, "class raster") as src:
        table = read_class_table(src)
    boundary = None
    distance = False
    if probabilities is not None:
        with open_raster(probabilities, "object-probability raster") as ds:
            _, boundary = probability_bands(ds)
            distance = boundary is not None and "distance" in map_bands(ds)
    else:
        boundary = next((c for c, v in table.items() if str(v["name"]).strip().lower() == BOUNDARY_NAME), None)
    ids = sorted(table) or sorted({int(w) for w in wanted if str(w).strip().isdigit()})
    names = [table.get(c, {}).get("name", f"class {c}") for c in ids]
    cls, cnames = resolve_object_classes(wanted, ids, names, boundary)
    spec = ObjectSpec(classes=cls, names=cnames, boundary=boundary, seed=seed, halo=halo, distance=distance)
    layer = layer or f"{scene_layer_name(classes)}_objects"

    def write(targets: list[tuple[Path, Path]]) -> ObjectResult:
        return write_objects(
            classes,
            targets,
            spec,
            probabilities=probabilities,
            confidence=confidence,
            min_area=min_area,
            simplify=simplify,
            block_size=block_size,
            layer=layer,
        )

    res = write_files(out, [classes, probabilities, confidence], write, kind="objects", layer=layer)
    if isinstance(res, ObjectResult) and res.n_objects == 0:
        log.warning(
            "no objects of class %s in %s: no pixel of %s, or none above --min-area",
            ",".join(map(str, cls)),
            classes,
            "it" if len(cls) == 1 else "them",
        )
    return res
