"""Class regions: every connected region of one class becomes one polygon.

:func:`class_layer` is the layer (:class:`~geovae.vector.engine.Layer`) of class regions
with their attributes (class, area, mean confidence and uncertainty, anomaly fraction),
fed blocks by a reader: of a finished class raster (:func:`write_polygons`,
:func:`vectorize`) or of a run as it writes (:class:`~geovae.vector.stream.PolygonStream`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from geovae.choices import Connectivity
from geovae.products import ATTRIBUTE_COLUMNS, area_column
from geovae.vector import trace
from geovae.vector.engine import Layer, VectorizeResult, check_options
from geovae.vector.formats import ColumnType, style_geopackages, write_files
from geovae.vector.rasters import ClassRaster, read_floats

__all__ = ["BlockValues", "anomaly_flags", "class_layer", "scene_layer_name", "vectorize", "write_polygons"]


@dataclass
class BlockValues:
    """One block of a class raster and the bands averaged per polygon (float32, NaN at nodata;
    ``anom`` 1 above the anomaly threshold, 0 below)."""

    classes: np.ndarray
    valid: np.ndarray
    conf: np.ndarray | None = None
    unc: np.ndarray | None = None
    anom: np.ndarray | None = None


def anomaly_flags(err: np.ndarray, threshold: float | None) -> np.ndarray:
    """1 where the reconstruction error is above ``threshold``, 0 below, NaN at nodata."""
    return np.where(np.isnan(err), np.nan, (err > threshold).astype(np.float32))


def class_layer(
    read: Callable[[Window], BlockValues | None],
    dtype: np.dtype,
    names: dict[int, str],
    area_col: str,
    connectivity: int,
    *,
    conf: bool,
    unc: bool,
    anom: bool,
) -> Layer:
    """The class-region layer.

    Args:
        read: ``read(window) -> BlockValues | None`` (None: all nodata) gives the pixels.
        dtype: the class ids' dtype.
        names: class id -> name (``"class <id>"`` for an id it lacks).
        area_col: the area column's name (:func:`~geovae.products.area_column`).
        connectivity: 4 or 8.
        conf, unc, anom: whether the blocks carry confidence, uncertainty and anomaly flags;
            the mean of a band they lack is null.
    """
    # rasterio.features.shapes takes (u)int8/16 and int32; wider integers are narrowed.
    shapes_dtype = dtype if dtype in (np.uint8, np.uint16, np.int16, np.int32) else np.dtype(np.int32)

    def pieces(win: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        v = read(win)
        if v is None:
            return None
        data = v.classes if v.classes.dtype == shapes_dtype else v.classes.astype(shapes_dtype)
        return trace.block_pieces(data, v.valid, win, connectivity, v.conf, v.unc, v.anom)

    def attributes(cls: np.ndarray, stats: np.ndarray, area: np.ndarray) -> dict[str, Any]:
        nan = np.full(len(cls), np.nan)
        return {
            "class_id": cls,
            "class_name": [names.get(int(k), f"class {int(k)}") for k in cls],
            area_col: area,
            "confidence_mean": trace.mean(stats[:, 0], stats[:, 1]) if conf else nan,
            "uncertainty_mean": trace.mean(stats[:, 2], stats[:, 3]) if unc else nan,
            "anomaly_fraction": trace.mean(stats[:, 4], stats[:, 5]) if anom else nan,
        }

    cols = tuple(area_col if c == "area" else c for c in ATTRIBUTE_COLUMNS)
    types: dict[str, ColumnType] = {
        c: ("int32" if c == "class_id" else object if c == "class_name" else "float64") for c in cols
    }
    return Layer(pieces, attributes, cols, types)


def scene_layer_name(classes: str | os.PathLike[str]) -> str:
    """The polygon layer's name: the scene's stem, read off its class raster's file name."""
    name = Path(str(classes)).name
    for suffix in (".classes.tif", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "polygons"
    return name.rsplit(".", 1)[0] or "polygons"


def vectorize(
    classes: str | os.PathLike[str],
    out: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    confidence: str | os.PathLike[str] | None = None,
    uncertainty: str | os.PathLike[str] | None = None,
    anomaly: tuple[str | os.PathLike[str], float] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    class_names: dict[int, str] | None = None,
    block_size: int = 1024,
    connectivity: Connectivity = 4,
    layer: str | None = None,
) -> Any:
    """Polygonise a class raster block-wise into GeoJSON, GeoPackage and/or GeoParquet files.

    Every connected region of one class (nodata excluded) becomes one polygon, whatever the
    block size: pieces cut by block lines are joined before anything is written. The files
    appear together when complete (:class:`geovae.atomic.OutputSet`); an existing
    GeoPackage keeps its other layers and only ``layer`` is replaced.

    Args:
        classes: class raster (integer class ids in band 1; nodata from its tag, alpha band
            or internal mask).
        out: output path, or a list of them; the suffix picks the format: ``.geojson``
            (RFC 7946, EPSG:4326), ``.gpkg`` or ``.parquet`` (GeoParquet), both in the
            raster's CRS. One polygonisation serves all outputs. None returns the polygons
            as a ``geopandas.GeoDataFrame`` (in the raster's CRS) instead of writing files.
        confidence: optional raster on the same grid whose band 1 is averaged per polygon
            (``confidence_mean``); NaN pixels are left out of the mean.
        uncertainty: optional raster on the same grid whose band 1 (predictive entropy) is
            averaged per polygon (``uncertainty_mean``).
        anomaly: optional ``(reconstruction-error raster, threshold)``: the share of each
            polygon's pixels whose error is above the threshold (``anomaly_fraction``).
        min_area: polygons smaller than this (m^2; square pixels for a raster without CRS)
            are dropped, after joining.
        simplify: topology-preserving simplification tolerance in metres (pixels without CRS).
        class_names: class id -> name; default the raster's class table
            (:func:`geovae.products.read_class_table`), else ``"class <id>"``.
        block_size: side of the square windows polygonised at a time, in pixels.
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours) form a region.
        layer: name of the polygon layer; default the scene's name from the class raster's
            file name (``nc.classes.tif`` -> ``nc``).

    Returns:
        A :class:`VectorizeResult` (the written paths, the polygon count and the total area
        per class), or a GeoDataFrame when ``out`` is None.

    Raises:
        SceneError: the class raster is missing or not a readable raster, or its band 1 is
            not integer.
        OptionError: unknown output suffix, an output given twice, GeoJSON asked for a raster
            without CRS, a confidence/uncertainty raster on another grid, or an option out of
            range.
        OutputError: an output folder is missing or not writable, an output would replace an
            input raster, or the disk is full.
    """
    layer = layer or scene_layer_name(classes)
    inputs = [classes, confidence, uncertainty, anomaly[0] if anomaly else None]

    def write(targets: list[tuple[Path, Path]]) -> VectorizeResult:
        return write_polygons(
            classes,
            targets,
            confidence=confidence,
            uncertainty=uncertainty,
            anomaly=anomaly,
            min_area=min_area,
            simplify=simplify,
            class_names=class_names,
            block_size=block_size,
            connectivity=connectivity,
            layer=layer,
        )

    return write_files(out, inputs, write, kind="polygons", layer=layer)


def write_polygons(
    classes: str | os.PathLike[str],
    targets: Sequence[tuple[Path, Path]],
    *,
    confidence: str | os.PathLike[str] | None = None,
    uncertainty: str | os.PathLike[str] | None = None,
    anomaly: tuple[str | os.PathLike[str], float] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    class_names: dict[int, str] | None = None,
    block_size: int = 1024,
    connectivity: Connectivity = 4,
    layer: str = "polygons",
    progress: Callable[[int, int], None] | None = None,
) -> VectorizeResult:
    """:func:`vectorize` into given files, for a caller that owns the atomic writing.

    Args:
        targets: ``(final path, path to write)`` per output: the final path decides the
            format (and, for a GeoPackage, which file's other layers to keep); the data go to
            the second (a file in an :class:`~geovae.atomic.OutputSet`'s staging folder).
        progress: an optional callable ``progress(done_rows, total_rows)`` called after
            each row of blocks.

    The other arguments and the errors are those of :func:`vectorize`.
    """
    check_options(block_size, connectivity, min_area, simplify)
    with ClassRaster(classes, targets) as raster:
        src = raster.src
        conf_ds = raster.band(confidence, "confidence")
        unc_ds = raster.band(uncertainty, "uncertainty")
        anom_ds = raster.band(anomaly[0] if anomaly else None, "reconstruction-error")
        threshold = anomaly[1] if anomaly else None
        table = raster.class_table()
        names = {k: v["name"] for k, v in table.items()}
        if class_names:
            names.update({int(k): str(v) for k, v in class_names.items()})

        def read(win: Window) -> BlockValues | None:
            valid = src.read_masks(1, window=win) > 0
            if not valid.any():
                return None
            err = read_floats(anom_ds, win)
            anom = None if err is None else anomaly_flags(err, threshold)
            return BlockValues(
                src.read(1, window=win), valid, read_floats(conf_ds, win), read_floats(unc_ds, win), anom
            )

        spec = class_layer(
            read,
            np.dtype(src.dtypes[0]),
            names,
            area_column(src.crs is None),
            connectivity,
            conf=conf_ds is not None,
            unc=unc_ds is not None,
            anom=anom_ds is not None,
        )
        res = raster.trace(
            spec,
            block=block_size,
            min_area=min_area,
            simplify=simplify,
            connectivity=connectivity,
            name=layer,
            progress=progress,
        )
        style_geopackages(targets, layer, table, names)
        return res
