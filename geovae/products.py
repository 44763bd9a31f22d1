"""The output contract: what a run writes, under which names, with which profiles and tags.

Every writer (the raster sink, the polygon writer, the quicklook, the report) takes its names,
GeoTIFF profiles and tags from here, and every reader of geovae's own outputs (vectorize,
evaluate, the viewer) reads them back through here, so the two sides cannot drift apart.

Names: ``<stem>.<suffix>`` in the output folder, ``stem`` being the scene's file name
without its extension (:attr:`geovae.scene.Scene.stem`); see :data:`KINDS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from geovae.choices import POLYGON_FORMAT_NAMES, PolygonFormat
from geovae.classes import CLASS_NODATA
from geovae.errors import OptionError

__all__ = [
    "ATTRIBUTE_COLUMNS",
    "CLASS_NODATA",
    "COG_ZSTD_LEVEL",
    "KINDS",
    "OBJECT_COLUMNS",
    "POLYGON_FORMATS",
    "RASTER_KINDS",
    "RASTER_STYLES",
    "PolygonFormat",
    "area_column",
    "check_formats",
    "class_table",
    "cog_options",
    "object_kind",
    "output_name",
    "overview_resampling",
    "polygon_format",
    "raster_profile",
    "read_class_table",
    "read_max_entropy",
    "run_kinds",
    "tiled_geotiff",
    "uncertainty_tags",
    "write_class_table",
]

#: Every file a segment run may write, in the order a run moves them into place (the
#: report, which vouches for the rest, last), with its name suffix. Besides the rasters and
#: polygons: the class raster's GDAL sidecar (category names, attribute table, colour
#: table), QGIS styles (``.qml``, loaded by QGIS with the file of the same base name), the
#: quicklook and the STAC Item.
KINDS: dict[str, str] = {
    "classes": "classes.tif",
    "classes_aux": "classes.tif.aux.xml",
    "confidence": "confidence.tif",
    "uncertainty": "uncertainty.tif",
    "reconstruction_error": "reconstruction-error.tif",
    "object_probability": "object-probability.tif",
    "classes_style": "classes.qml",
    "confidence_style": "confidence.qml",
    "uncertainty_style": "uncertainty.qml",
    "reconstruction_error_style": "reconstruction-error.qml",
    "object_probability_style": "object-probability.qml",
    "geojson": "geojson",
    "gpkg": "gpkg",
    "parquet": "parquet",
    "objects_geojson": "objects.geojson",
    "objects_gpkg": "objects.gpkg",
    "objects_parquet": "objects.parquet",
    "polygons_style": "qml",
    "objects_style": "objects.qml",
    "quicklook": "png",
    "stac": "stac.json",
    "report": "json",
}

#: The QGIS style of each raster kind.
RASTER_STYLES: dict[str, str] = {
    k: f"{k}_style" for k in ("classes", "confidence", "uncertainty", "reconstruction_error", "object_probability")
}

#: The raster kinds, in writing order.
RASTER_KINDS = ("classes", "confidence", "uncertainty", "reconstruction_error", "object_probability")


def object_kind(fmt: str) -> str:
    """The kind of the object polygons (``--objects``) in polygon format ``fmt``: ``objects_gpkg``..."""
    return f"objects_{fmt}"


#: Each polygon format's suffix and OGR driver, in :data:`~geovae.choices.PolygonFormat`'s
#: order. GeoParquet is written through pyarrow.
POLYGON_FORMATS: dict[PolygonFormat, tuple[str, str]] = {
    "geojson": (".geojson", "GeoJSON"),
    "gpkg": (".gpkg", "GPKG"),
    "parquet": (".parquet", "Parquet"),
}


def polygon_format(name: str) -> PolygonFormat:
    """``name`` (``geojson``, ``.GPKG``...) as a polygon format.

    Args:
        name: a format name as a user types it: any case, with or without a leading dot.

    Returns:
        The format.

    Raises:
        OptionError: not a polygon format.
    """
    key = name.strip().lower().lstrip(".")
    for fmt in POLYGON_FORMAT_NAMES:
        if fmt == key:
            return fmt
    raise OptionError(f"--formats {key}: unknown polygon format; use {', '.join(POLYGON_FORMAT_NAMES)}")


#: Internal tiling of every output raster (and of its overviews).
BLOCKSIZE = 256


def run_kinds(
    rasters: Sequence[str], formats: Sequence[str], *, quicklook: bool, stac: bool = True, objects: bool = False
) -> list[str]:
    """The kinds one run writes, in commit order (:data:`KINDS`' order, the report last).

    Args:
        rasters: the raster kinds written (``classes`` and ``confidence`` always).
        formats: the polygon formats written.
        quicklook: whether a quicklook is drawn.
        stac: whether a STAC Item is written.
        objects: whether object polygons are written (``--objects``), in every format.
    """
    want = set(rasters) | {RASTER_STYLES[k] for k in rasters} | set(formats) | {"report"}
    if "classes" in rasters:
        want.add("classes_aux")
    if set(formats) & {"geojson", "parquet"}:
        want.add("polygons_style")  # QGIS reads <stem>.qml for <stem>.geojson / .parquet
    if objects:
        want |= {object_kind(f) for f in formats}
        if set(formats) & {"geojson", "parquet"}:
            want.add("objects_style")
    if quicklook:
        want.add("quicklook")
    if stac:
        want.add("stac")
    return [k for k in KINDS if k in want]


def output_name(stem: str, kind: str) -> str:
    """The file name of output ``kind`` of scene ``stem``, e.g. ``nc.classes.tif``."""
    return f"{stem}.{KINDS[kind]}"


def check_formats(formats: Sequence[str] | str | None, pixel_coords: bool) -> list[PolygonFormat]:
    """The polygon formats to write, checked.

    Args:
        formats: names among ``geojson``, ``gpkg``, ``parquet`` (a list, or one comma-separated
            string as typed on a command line); None for the default (``geojson``, ``gpkg``
            in pixel coordinates).
        pixel_coords: whether the outputs are in pixel coordinates (GeoJSON is refused).

    Returns:
        The formats, lower case, without duplicates.

    Raises:
        OptionError: an unknown format, or GeoJSON in pixel coordinates.
    """
    if formats is None:
        return ["gpkg"] if pixel_coords else ["geojson"]
    if isinstance(formats, str):  # "geojson,gpkg" as typed on a command line
        formats = [f for f in formats.split(",") if f.strip()]
    fmts = [polygon_format(f) for f in formats]
    if pixel_coords and "geojson" in fmts:
        raise OptionError(
            "--formats geojson: GeoJSON needs real coordinates (EPSG:4326) and this scene is in "
            "pixel coordinates; use --formats gpkg or parquet"
        )
    return list(dict.fromkeys(fmts))


# -- rasters -------------------------------------------------------------------------------

#: Band count, dtype, nodata and predictor of each raster kind.
_RASTER_SPECS: dict[str, dict[str, Any]] = {
    "classes": dict(count=1, dtype="uint8", nodata=CLASS_NODATA, predictor=2),
    "confidence": dict(count=1, dtype="float32", nodata=float("nan"), predictor=3),
    "uncertainty": dict(count=2, dtype="float32", nodata=float("nan"), predictor=3),
    "reconstruction_error": dict(count=1, dtype="float32", nodata=float("nan"), predictor=3),
    # one band per object class, then the boundary class (``count`` given by the writer)
    "object_probability": dict(count=1, dtype="float32", nodata=float("nan"), predictor=3),
}

#: Band descriptions of each raster kind.
BAND_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "classes": ("class",),
    "confidence": ("confidence (max blended class probability)",),
    "uncertainty": ("predictive entropy (nats)", "mutual information (nats)"),
    "reconstruction_error": ("reconstruction error (MSE, normalised units)",),
    "object_probability": (),  # "probability of <class>", one per band, named by the writer
}


#: ZSTD level of the streaming GeoTIFF the blocks are written into before the COG copy. Level
#: 1 is 4x faster than the default 9 on the confidence raster of the Parana scene (0.07 s vs
#: 0.30 s) for a file 3 % larger, and that file only lives until the COG copy re-compresses
#: it at the default level (benchmarks/bench_cog.py).
STREAM_ZSTD_LEVEL = 1

#: ZSTD level of each raster kind's COG. Float rasters hardly compress beyond what the
#: floating-point predictor gives: on the Parana scene's outputs level 1 writes the confidence
#: and reconstruction-error COGs 2.3x faster than the default 9 (0.17 s against 0.39 s each)
#: into files 1-2.3 % larger, time a run spends after its model is done, on the cores other work
#: may hold. The class raster, small and compressible, keeps level 9 (0.4 MiB against 0.5).
COG_ZSTD_LEVEL: dict[str, int] = {
    "classes": 9,
    "confidence": 1,
    "uncertainty": 1,
    "reconstruction_error": 1,
    "object_probability": 1,
}


def raster_profile(
    kind: str, *, width: int, height: int, crs: Any, transform: Any, stream: bool = False, count: int | None = None
) -> dict[str, Any]:
    """Creation options of output raster ``kind``: tiled 256 x 256, ZSTD with a predictor.

    Args:
        kind: one of :data:`RASTER_KINDS`.
        width, height: size in pixels.
        crs: the scene's CRS (None in pixel coordinates).
        transform: the output's geotransform.
        stream: the profile of the temporary GeoTIFF a run streams its blocks into before
            :func:`cog_options` makes the output (fast ZSTD level, same tiling and predictor).
        count: the band count of a kind whose bands vary (``object_probability``: one per
            object class and the boundary class).

    Returns:
        Keyword arguments for ``rasterio.open(path, "w", **profile)``.
    """
    extra = {"zstd_level": STREAM_ZSTD_LEVEL} if stream else {}
    spec = dict(_RASTER_SPECS[kind])
    if count is not None:
        spec["count"] = int(count)
    return {
        **tiled_geotiff(width=width, height=height, crs=crs, transform=transform, compress="zstd"),
        "BIGTIFF": "IF_SAFER",
        "interleave": "band",
        **spec,
        **extra,
    }


def tiled_geotiff(*, width: int, height: int, crs: Any, transform: Any, compress: str) -> dict[str, Any]:
    """A GeoTIFF on a grid, tiled in :data:`BLOCKSIZE` blocks: the profile every raster geovae
    writes starts from (band count, type and nodata are the caller's).

    Args:
        width, height: size in pixels.
        crs: the CRS (None in pixel coordinates).
        transform: the geotransform.
        compress: GDAL's compression (``zstd``, ``deflate``).

    Returns:
        Keyword arguments for ``rasterio.open(path, "w", ...)``.
    """
    return dict(
        driver="GTiff",
        width=width,
        height=height,
        crs=crs,
        transform=transform,
        tiled=True,
        blockxsize=BLOCKSIZE,
        blockysize=BLOCKSIZE,
        compress=compress,
    )


def overview_resampling(kind: str) -> str:
    """GDAL resampling of raster ``kind``'s overviews: ``MODE`` for class ids (an average of
    ids is meaningless), ``AVERAGE`` for the float rasters. GDAL leaves nodata out of both."""
    return "MODE" if kind == "classes" else "AVERAGE"


def cog_options(kind: str, *, overviews: bool = True, threads: int | None = None) -> dict[str, str]:
    """Creation options of GDAL's COG driver for output raster ``kind``.

    The outputs are Cloud Optimized GeoTIFFs: 256 x 256 tiles, ZSTD at the kind's
    :data:`COG_ZSTD_LEVEL` with its predictor (horizontal differencing for class ids, floating
    point for the float rasters),
    overviews down to one tile made by the driver with :func:`overview_resampling`, the
    overviews' tiles before the full-resolution ones (what ``rio cogeo validate`` checks).

    Args:
        kind: one of :data:`RASTER_KINDS`.
        overviews: build overviews (``False``: a COG without them).
        threads: compress with this many threads (GDAL's ``NUM_THREADS``; the bytes written are
            the same). None leaves it to GDAL's ``GDAL_NUM_THREADS`` setting (one by default).

    Returns:
        Keyword arguments for ``rasterio.shutil.copy(src, dst, driver="COG", **options)``.
    """
    spec = _RASTER_SPECS[kind]
    opts = {
        "COMPRESS": "ZSTD",
        "LEVEL": str(COG_ZSTD_LEVEL[kind]),
        "PREDICTOR": "FLOATING_POINT" if spec["predictor"] == 3 else "STANDARD",
        "BLOCKSIZE": str(BLOCKSIZE),
        "BIGTIFF": "IF_SAFER",
        "OVERVIEWS": "AUTO" if overviews else "NONE",
        "OVERVIEW_RESAMPLING": overview_resampling(kind),
    }
    if threads is not None:
        opts["NUM_THREADS"] = str(max(1, int(threads)))
    return opts


def write_class_table(ds: Any, ids: Sequence[int], names: Sequence[str], colors: Sequence[Sequence[int]]) -> None:
    """Write the class table into an open class raster: colour table, names, ``CLASSES`` JSON."""
    ds.write_colormap(1, {int(c): (*[int(v) for v in col][:3], 255) for c, col in zip(ids, colors)})
    ds.update_tags(**{f"CLASS_{c}": n for c, n in zip(ids, names)})
    ds.update_tags(
        CLASSES=json.dumps(
            [{"id": int(c), "name": n, "color": [int(v) for v in col][:3]} for c, n, col in zip(ids, names, colors)]
        ),
        NODATA_MEANING=f"{CLASS_NODATA} = no data (invalid input pixel)",
    )


def class_table(ids: Sequence[int], names: Sequence[str], colors: Sequence[Sequence[int]]) -> dict[int, dict[str, Any]]:
    """The class table of a model's classes, as :func:`read_class_table` reads it back from
    the class raster :func:`write_class_table` wrote: ``{id: {"name": str, "color": [r, g, b]}}``."""
    return {int(c): {"name": str(n), "color": [int(v) for v in col][:3]} for c, n, col in zip(ids, names, colors)}


def read_class_table(ds: Any) -> dict[int, dict[str, Any]]:
    """The class table of an open class raster: ``{id: {"name": str, "color": [r, g, b] | None}}``.

    Reads what :func:`write_class_table` wrote (the ``CLASSES`` JSON tag), else the
    ``CLASS_<id>`` tags, else nothing (a class raster from another tool); colours fall back
    to the colour table.
    """
    tags = ds.tags()
    out: dict[int, dict[str, Any]] = {}
    try:
        for c in json.loads(tags["CLASSES"]):
            out[int(c["id"])] = {"name": str(c["name"]), "color": c.get("color")}
        return out
    except (KeyError, TypeError, ValueError):
        pass
    for k, v in tags.items():
        if k.upper().startswith("CLASS_") and k[6:].isdigit():
            out[int(k[6:])] = {"name": v, "color": None}
    try:
        cmap = ds.colormap(1)
    except ValueError:
        cmap = {}
    for cid, entry in out.items():
        if entry["color"] is None and cid in cmap:
            entry["color"] = list(cmap[cid][:3])
    return out


def uncertainty_tags(num_classes: int) -> dict[str, str]:
    """Tags of the uncertainty raster: its units and the largest possible entropy, log K."""
    return {"UNITS": "nats", "MAX_ENTROPY": str(math.log(num_classes))}


def read_max_entropy(ds: Any) -> float | None:
    """The ``MAX_ENTROPY`` tag of an uncertainty raster, or None when absent or unreadable."""
    try:
        return float(ds.tags()["MAX_ENTROPY"])
    except (KeyError, ValueError):
        return None


# -- polygons ------------------------------------------------------------------------------


def area_column(pixel_coords: bool) -> str:
    """The polygons' (and the report's) area attribute, named by its unit."""
    return "area_px" if pixel_coords else "area_m2"


#: Attribute columns of the polygon outputs, in order; ``area`` is :func:`area_column`.
ATTRIBUTE_COLUMNS = ("class_id", "class_name", "area", "confidence_mean", "uncertainty_mean", "anomaly_fraction")

#: Attribute columns of the object polygons (``--objects``), in order; ``area`` is :func:`area_column`.
OBJECT_COLUMNS = ("object_id", "class_id", "class_name", "area", "confidence_mean", "score")
