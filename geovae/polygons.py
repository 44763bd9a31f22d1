"""Class raster -> polygons -> GeoJSON / GeoPackage / GeoParquet, in bounded memory.

The raster is polygonised block by block (``rasterio.features.shapes`` over windows of
``block_size`` pixels). A piece that touches a block line shared with another block is
held back; once a whole row of blocks is done, held pieces of the same class that share an
edge across a block line are joined (an STRtree finds candidate neighbours, connected
components group them, one union per group), and every joined region that cannot grow any
further (it does not reach the next row of blocks) is written out. Pieces that touch no
shared block line are complete the moment they are traced and go straight to the
output. So no polygon is ever cut by a block line, and memory holds one block of pixels,
the pieces along the open block lines and the output buffer, never the whole raster.

All joining happens in pixel coordinates, where every vertex is an exact integer: pieces
from two blocks meet on bit-identical coordinates, so unions are exact. The affine transform
to the raster's CRS is applied once per finished polygon.

Simplification (``simplify`` > 0) is topology-preserving: ``shapely.coverage_simplify``
simplifies each shared edge once, so neighbours still share it. It needs the whole coverage
at once, so with ``simplify`` every polygon (densified to one vertex per pixel step, which
coverage simplification needs to see identical shared edges) is loaded into memory at the
end (gathered in a temporary GeoPackage first): memory then grows with the number of polygon
vertices. Without it, memory grows only with the open block lines while polygonising, and
every format is written as the polygons are finished: one thread per format takes Arrow
batches (WKB geometry) after every block (:class:`_FormatWriters`).

In a ``segment`` run the blocks come from the stitcher as it writes them
(:class:`PolygonStream`): the polygons are traced and written while the model computes.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import tempfile
import threading
import warnings
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import rasterio
import rasterio.features
import rasterio.transform
import shapely
from affine import EPSILON, Affine
from pyproj import CRS as ProjCRS
from rasterio.windows import Window

from geovae.areas import AreaMeasure
from geovae.atomic import check_output_file
from geovae.choices import CONNECTIVITIES, Connectivity
from geovae.errors import OptionError, SceneError
from geovae.products import ATTRIBUTE_COLUMNS, CLASS_NODATA, POLYGON_FORMATS, area_column, read_class_table
from geovae.scene import capped_gdal_cache, grid_mismatch, open_raster

__all__ = ["PolygonStream", "VectorizeResult", "scene_layer_name", "vectorize", "write_polygons"]

#: Finished polygons are flushed to the temporary GeoPackage in chunks of this many
#: (20,000 holds ~45 MiB more at peak for no measurable speed-up).
_FLUSH_EVERY = 5_000
#: Polygons per batch when streaming the parts file into GeoJSON / GeoParquet.
_STREAM_BATCH = 20_000

#: GDAL block cache while vectorising (bytes): blocks are read once, so a small cache.
_GDAL_CACHE_BYTES = 16 * 2**20

#: Sum and count of confidence, uncertainty and the anomaly flag per piece.
_NSTATS = 6

#: A layer column's pandas dtype: a dtype name, or ``object`` for text.
_ColumnType = str | type[object]


@dataclass
class VectorizeResult:
    """What :func:`vectorize` wrote.

    Attributes:
        paths: the output files, in the order asked for.
        n_polygons: number of polygons in each output.
        class_areas_m2: total polygon area per class id, in square metres (square pixels
            for a raster without CRS, where ``area_unit`` is ``"px"``).
        area_unit: ``"m2"``, or ``"px"`` in pixel coordinates.
    """

    paths: list[Path]
    n_polygons: int
    class_areas_m2: dict[int, float] = field(default_factory=dict)
    area_unit: str = "m2"


# --------------------------------------------------------------------------------------
# input checks


def _check_same_grid(src: rasterio.DatasetReader, other: rasterio.DatasetReader, what: str) -> None:
    # affine's default tolerance (1e-5): rasters written together by any tool pass
    problems = grid_mismatch(src, other, precision=EPSILON)
    if problems:
        raise OptionError(
            f"{what} raster {other.name} is on another grid than the class raster {src.name} "
            f"({'; '.join(problems)}); pass the {what} raster written together with the classes"
        )


# --------------------------------------------------------------------------------------
# units and areas


class _Measure:
    """Areas in square metres (:class:`geovae.areas.AreaMeasure`, the convention the run
    report shares) and the simplification tolerance in CRS units, for one CRS."""

    def __init__(self, crs: rasterio.crs.CRS | None, bounds: tuple[float, float, float, float]):
        self.area = AreaMeasure(crs)
        self.areas = self.area.areas
        self.metres_per_unit_tol = self.area.unit_m
        if self.area.geod is not None:
            geod = self.area.geod
            lon = (bounds[0] + bounds[2]) / 2
            lat = (bounds[1] + bounds[3]) / 2
            # A degree of longitude shrinks with latitude; the tolerance uses the mean of
            # the east-west and north-south lengths of one degree at the raster's centre.
            _, _, d_lat = geod.inv(lon, lat - 0.5, lon, lat + 0.5)
            _, _, d_lon = geod.inv(lon - 0.5, lat, lon + 0.5, lat)
            self.metres_per_unit_tol = (d_lat + d_lon) / 2

    def tolerance(self, metres: float) -> float:
        return metres / self.metres_per_unit_tol


# --------------------------------------------------------------------------------------
# polygonising


def _windows(width: int, height: int, block: int) -> Iterator[list[Window]]:
    """Rows of block windows, top to bottom; the last row and column may be smaller."""
    for row_off in range(0, height, block):
        h = min(block, height - row_off)
        yield [Window(col_off, row_off, min(block, width - col_off), h) for col_off in range(0, width, block)]


class _Pieces:
    """Column store of polygons in pixel coordinates with their class and (sum, count) stats."""

    def __init__(self) -> None:
        self.geoms: list[np.ndarray] = []
        self.cls: list[np.ndarray] = []
        self.stats: list[np.ndarray] = []  # (n, _NSTATS): sum and count of each averaged band

    def add(self, geoms: np.ndarray, cls: np.ndarray, stats: np.ndarray) -> None:
        if len(geoms):
            self.geoms.append(geoms)
            self.cls.append(cls)
            self.stats.append(stats)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.geoms:
            return np.empty(0, dtype=object), np.empty(0, dtype=np.int64), np.empty((0, _NSTATS))
        out = np.concatenate(self.geoms), np.concatenate(self.cls), np.concatenate(self.stats)
        self.geoms, self.cls, self.stats = [], [], []
        return out


def _block_pieces(
    classes: np.ndarray,
    valid: np.ndarray,
    window: Window,
    connectivity: int,
    conf: np.ndarray | None,
    unc: np.ndarray | None,
    anom: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polygonise one block; return pieces in global pixel coordinates, classes and stats.

    ``conf``, ``unc`` and ``anom`` (1 where the reconstruction error is above the model's
    threshold, 0 below, NaN at nodata) are summed and counted per piece, so that joined
    pieces' means are exact.
    """
    to_pixels = Affine.translation(window.col_off, window.row_off)
    # Building shapely objects one GeoJSON dict at a time dominates the run time; gathering
    # all rings' vertices first and building every polygon in one vectorised call does not.
    # The vertices go into a flat array of doubles (16 bytes a vertex) rather than a list
    # of the (x, y) tuples shapes() made (over 100 bytes a vertex, a block's worth at once).
    coords = array("d")
    add_coords = coords.extend
    ring_ends: list[int] = [0]
    poly_ends: list[int] = [0]
    cls: list[int] = []
    for geom, value in rasterio.features.shapes(classes, mask=valid, connectivity=connectivity, transform=to_pixels):
        for ring in geom["coordinates"]:
            add_coords(chain.from_iterable(ring))
            ring_ends.append(len(coords) >> 1)
        poly_ends.append(len(ring_ends) - 1)
        cls.append(int(value))
    cls_arr = np.array(cls, dtype=np.int64)
    if not cls:
        return np.empty(0, dtype=object), cls_arr, np.zeros((0, _NSTATS))
    xy = np.frombuffer(coords, dtype=np.float64).reshape(-1, 2)
    rings = np.asarray(ring_ends, dtype=np.int64)
    polys = np.asarray(poly_ends, dtype=np.int64)
    garr = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, (rings, polys))
    stats = np.zeros((len(garr), _NSTATS))
    if conf is not None or unc is not None or anom is not None:
        ids = _piece_ids(xy, rings, polys, classes, valid, cls_arr, window)
        ids_flat = ids.ravel()
        for k, band in ((0, conf), (2, unc), (4, anom)):
            if band is None:
                continue
            ok = np.isfinite(band).ravel() & (ids_flat > 0)
            lab = ids_flat[ok]
            stats[:, k] = np.bincount(lab, weights=band.ravel()[ok].astype(np.float64), minlength=len(garr) + 1)[1:]
            stats[:, k + 1] = np.bincount(lab, minlength=len(garr) + 1)[1:]
    return garr, cls_arr, stats


def _piece_ids(
    xy: np.ndarray,
    ring_ends: np.ndarray,
    poly_ends: np.ndarray,
    classes: np.ndarray,
    valid: np.ndarray,
    cls: np.ndarray,
    window: Window,
) -> np.ndarray:
    """Label image of one block: pixel -> 1 + index of the piece holding it (0: nodata).

    Read off the pieces' own rings instead of rasterising them again: in every row, a run
    of one piece's pixels starts at a vertical edge of that piece with the piece on its
    right (pixel (row, x) holds the piece's class; the pixel on the left cannot, or it would
    be the same region). Marking those run starts and carrying each mark to the right along
    its row gives every valid pixel its piece, exactly as rasterising the pixel-exact pieces
    would, at the cost of a few whole-block array passes.
    """
    h, w = classes.shape
    n_rings = len(ring_ends) - 1
    ring_of_pt = np.repeat(np.arange(n_rings), np.diff(ring_ends))
    piece_of_ring = np.repeat(np.arange(len(poly_ends) - 1), np.diff(poly_ends))
    x = xy[:, 0] - window.col_off
    y = xy[:, 1] - window.row_off
    # Vertical edges: consecutive vertices of one ring with the same x.
    seg = np.flatnonzero((ring_of_pt[:-1] == ring_of_pt[1:]) & (x[:-1] == x[1:]) & (y[:-1] != y[1:]))
    col = x[seg].astype(np.int64)
    top = np.minimum(y[seg], y[seg + 1]).astype(np.int64)
    length = np.abs(y[seg + 1] - y[seg]).astype(np.int64)
    piece = piece_of_ring[ring_of_pt[seg]]
    # The piece lies on the edge's right along the whole edge, or on its left along all of it.
    inside = col < w
    c_in = np.minimum(col, w - 1)
    starts = inside & valid[top, c_in] & (classes[top, c_in] == cls[piece])
    col, top, length, piece = col[starts], top[starts], length[starts], piece[starts]
    # One mark per row of each edge.
    offsets = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    marks = np.zeros((h, w), dtype=np.int32)
    marks[np.repeat(top, length) + offsets, np.repeat(col, length)] = np.repeat(piece + 1, length)
    last = np.where(marks > 0, np.arange(w, dtype=np.int32), 0)
    np.maximum.accumulate(last, axis=1, out=last)
    ids = np.take_along_axis(marks, last, axis=1)
    ids[~valid] = 0
    return ids


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes given undirected edges (i, j)."""
    parent = np.arange(n)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression keeps later look-ups O(1)
            parent[a], a = root, parent[a]
        return root

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)])


def _join(geoms: np.ndarray, cls: np.ndarray, stats: np.ndarray, connectivity: int) -> tuple[np.ndarray, ...]:
    """Join same-class pieces that touch across block lines; returns joined geoms/cls/stats."""
    if len(geoms) < 2:
        return geoms, cls, stats
    # Boxes first, then the exact test only on pairs of the same class: most touching
    # neighbours are of another class, and the exact predicates are the costly part.
    i, j = shapely.STRtree(geoms).query(geoms)
    keep = (i < j) & (cls[i] == cls[j])
    i, j = i[keep], j[keep]
    if len(i):
        if connectivity == 4:
            # Pieces of one class that meet only at a corner are separate regions with
            # 4-connectivity: join only those whose boundaries share a line.
            joined = shapely.relate_pattern(geoms[i], geoms[j], "F***1****")
        else:
            joined = shapely.intersects(geoms[i], geoms[j])
        i, j = i[joined], j[joined]
    if len(i) == 0:
        return geoms, cls, stats
    comp = _components(len(geoms), i, j)
    order = np.argsort(comp, kind="stable")
    comp_sorted = comp[order]
    starts = np.flatnonzero(np.r_[True, comp_sorted[1:] != comp_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    out_g = np.empty(len(starts), dtype=object)
    out_c = np.empty(len(starts), dtype=np.int64)
    out_s = np.empty((len(starts), _NSTATS))
    for k, (s, e) in enumerate(zip(starts, ends)):
        members = order[s:e]
        out_g[k] = geoms[members[0]] if e - s == 1 else _union_pieces(geoms[members])
        out_c[k] = cls[members[0]]
        out_s[k] = stats[members].sum(axis=0)
    return out_g, out_c, out_s


def _union_pieces(pieces: np.ndarray) -> shapely.Geometry:
    """Union of same-class pieces of one region, which meet only along block lines.

    A piece's holes lie inside its own block and hold other classes, so joining never
    touches them: uniting only the outer rings and putting the old holes back gives the
    same polygon as a full overlay, several times faster for regions with many holes.

    With 4-connectivity the result is valid by construction, so nothing checks it again:
    GDAL traces 4-connected regions as valid polygons (a hole meets its shell at most at
    one vertex), a GEOS union of valid polygons is valid, and a piece's holes lie inside
    its own shell, away from every other piece, each still meeting at most one ring at one
    vertex. An affine map to world coordinates keeps that. tests/test_vectorize.py checks
    every written polygon on real rasters and on random-noise ones (the worst case).
    """
    if not (shapely.get_type_id(pieces) == shapely.GeometryType.POLYGON).all():
        return shapely.union_all(pieces)  # 8-connected regions can be multi-part: full overlay
    merged = shapely.union_all(shapely.polygons(shapely.get_exterior_ring(pieces)))
    if merged.geom_type != "Polygon":
        return shapely.union_all(pieces)
    holes = [ring for piece in pieces for ring in piece.interiors]
    return shapely.Polygon(merged.exterior, [*merged.interiors, *holes])


def _valid(geoms: np.ndarray) -> np.ndarray:
    """Repair invalid geometries and keep only their polygonal part."""
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        fixed = shapely.make_valid(geoms[bad])
        # make_valid can return a collection with stray lines or points: keep area only.
        fixed = np.array(
            [g if g.geom_type in ("Polygon", "MultiPolygon") else _polygonal(g) for g in fixed], dtype=object
        )
        geoms = geoms.copy()
        geoms[bad] = fixed
    return geoms


def _polygonal(g: shapely.Geometry) -> shapely.Geometry:
    parts = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        return shapely.Polygon()
    return shapely.union_all(parts)


# --------------------------------------------------------------------------------------
# writing


class _PartsWriter:
    """Appends finished polygons (scene CRS) to a private GeoPackage in chunks."""

    def __init__(self, path: Path, crs: Any, geometry_type: str, columns: list[str], dtypes: dict[str, _ColumnType]):
        self.path = path
        self.crs = crs
        self.geometry_type = geometry_type
        self.columns = columns
        self.dtypes = dtypes
        self.buffer: list[dict[str, Any]] = []
        self.n = 0
        self.started = False

    def add(self, rows: dict[str, Any]) -> None:
        if len(rows["geometry"]):
            self.buffer.append(rows)
            if sum(len(r["geometry"]) for r in self.buffer) >= _FLUSH_EVERY:
                self.flush()

    def flush(self, force: bool = False) -> None:

        if not self.buffer and (self.started or not force):
            return
        cols = self.columns
        if self.buffer:
            df = pd.concat([pd.DataFrame(r) for r in self.buffer], ignore_index=True)
        else:
            df = pd.DataFrame({c: [] for c in [*cols, "geometry"]})
        df = df[[*cols, "geometry"]]
        for col in cols:
            df[col] = df[col].astype(self.dtypes[col])
        gdf = gpd.GeoDataFrame(df, geometry="geometry", crs=self.crs)
        with warnings.catch_warnings():
            # Pixel-coordinates mode has no CRS on purpose.
            warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
            pyogrio.write_dataframe(
                gdf,
                self.path,
                driver="GPKG",
                layer=_PARTS_LAYER,
                append=self.started,
                geometry_type=self.geometry_type,
                promote_to_multi=self.geometry_type == "MultiPolygon",
            )
        self.n += len(gdf)
        self.started = True
        self.buffer = []


_PARTS_LAYER = "polygons"


def _columns(area_col: str) -> list[str]:
    return [area_col if c == "area" else c for c in ATTRIBUTE_COLUMNS]


def _geoparquet_schema(schema: Any, geom_col: str, crs: Any, geometry_type: str) -> Any:
    """``schema`` with its WKB column named ``geometry`` and GeoParquet 1.1 ``geo`` metadata."""

    i = schema.get_field_index(geom_col)
    schema = schema.set(i, pa.field("geometry", pa.binary()))
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": [geometry_type],
                # PROJJSON, as GeoParquet asks; null means "unknown" (pixel coordinates).
                "crs": None if crs is None else json.loads(ProjCRS.from_wkt(crs.to_wkt()).to_json()),
            }
        },
    }
    return schema.with_metadata({b"geo": json.dumps(geo).encode()})


def _write_output(parts_path: Path, final: Path, dest: Path, crs: Any, geometry_type: str, layer: str) -> None:
    """Copy the parts GeoPackage into ``dest`` in the format ``final``'s suffix names, in
    Arrow record batches (WKB geometry) of ``_STREAM_BATCH`` polygons."""
    with pyogrio.raw.open_arrow(parts_path, layer=_PARTS_LAYER, batch_size=_STREAM_BATCH, use_pyarrow=True) as (
        meta,
        reader,
    ):
        _write_format(reader, meta.get("geometry_name") or "wkb_geometry", final, dest, crs, geometry_type, layer)


def _keep_other_layers(final: Path, dest: Path, layer: str) -> None:
    """A GeoPackage that already exists at ``final`` keeps its other layers (a user's basemap,
    another scene's polygons): it is copied to ``dest`` first and only ``layer`` is replaced
    in the copy."""

    if final.suffix.lower() == ".gpkg" and final.is_file() and final.resolve() != dest.resolve():
        try:
            others = [name for name, _ in pyogrio.list_layers(final) if name != layer]
        except Exception:
            others = []
        if others:
            shutil.copyfile(final, dest)


def _write_format(
    reader: Any, geom_col: str, final: Path, dest: Path, crs: Any, geometry_type: str, layer: str
) -> None:
    """Write the Arrow record batches of ``reader`` (a WKB geometry column ``geom_col`` and
    the attribute columns) into ``dest`` in the format ``final``'s suffix names."""
    suffix = final.suffix.lower()
    _keep_other_layers(final, dest, layer)
    if suffix == ".geojson":
        # RFC7946=YES makes GDAL reproject to WGS84 lon/lat itself (given the layer's CRS),
        # write right-hand (CCW exterior) rings and cut polygons at the antimeridian.
        pyogrio.write_arrow(
            reader,
            dest,
            driver="GeoJSON",
            layer=layer,
            geometry_name=geom_col,
            geometry_type=geometry_type,
            crs=crs.to_wkt(),
            layer_options={"RFC7946": "YES"},
        )
    elif suffix == ".gpkg":
        # Into an existing GeoPackage (the copy above) GDAL replaces just this layer.
        pyogrio.write_arrow(
            reader,
            dest,
            driver="GPKG",
            layer=layer,
            geometry_name=geom_col,
            geometry_type=geometry_type,
            crs=None if crs is None else crs.to_wkt(),
        )
    else:
        schema = _geoparquet_schema(reader.schema, geom_col, crs, geometry_type)
        with pq.ParquetWriter(dest, schema) as w:
            for batch in reader:
                w.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))


def _load_lazy_imports() -> None:
    """Make, on the calling thread, the conversions whose first use imports modules
    (``pa.array(..., from_pandas=True)`` imports pyarrow.pandas_compat and what it needs),
    so the polygon threads never import (see :class:`PolygonStream`). Cheap after the first."""
    pa.array(np.array([np.nan]), type=pa.float64(), from_pandas=True)
    pa.array(["x"], type=pa.string(), from_pandas=True)


#: The Arrow type of each pandas dtype the layers' columns use.
_ARROW_TYPES: dict[_ColumnType, str] = {"int32": "int32", "int64": "int64", "float64": "float64", object: "string"}


class _FormatWriters:
    """Every output format written while the polygons are traced (no simplification).

    One thread per format runs :func:`_write_format` on an Arrow stream fed from a queue:
    GDAL formats the polygons (GeoJSON's text is slow: 1.5 s for 5,000 polygons of 290,000
    vertices) while the rest of the run goes on, instead of after it. Finished polygons go
    out in a batch after every block (and every ``_FLUSH_EVERY``); at most 2 batches wait per
    format, so a slow writer holds the tracing back rather than letting memory grow.
    """

    def __init__(
        self,
        targets: Sequence[tuple[Path, Path]],
        crs: Any,
        geometry_type: str,
        columns: list[str],
        dtypes: dict[str, _ColumnType],
        layer: str,
    ):

        _load_lazy_imports()
        self.columns = columns
        self.multi = geometry_type == "MultiPolygon"
        self.schema = pa.schema(
            [*(pa.field(c, _ARROW_TYPES[dtypes[c]]) for c in columns), pa.field("geometry", pa.binary())]
        )
        self.buffer: list[dict[str, Any]] = []
        self.n = 0
        self.errors: list[BaseException] = []
        self._stop = False
        self.queues: list[Any] = []
        self.threads: list[Any] = []
        for final, dest in targets:
            q: Any = queue.Queue(maxsize=2)
            t = threading.Thread(
                target=self._write,
                args=(q, Path(final), Path(dest), crs, geometry_type, layer),
                name="geovae-polygon-writer",
                daemon=True,
            )
            self.queues.append(q)
            self.threads.append(t)
            t.start()

    def _write(self, q: Any, final: Path, dest: Path, crs: Any, geometry_type: str, layer: str) -> None:

        def batches() -> Iterator[Any]:
            while True:
                item = q.get()
                if item is None:
                    return
                if item is _ABORT or self._stop:
                    raise _Stopped
                yield item

        try:
            reader = pa.RecordBatchReader.from_batches(self.schema, batches())
            _write_format(reader, "geometry", final, dest, crs, geometry_type, layer)
        except BaseException as exc:
            if not self._stop:
                self.errors.append(exc)

    def add(self, rows: dict[str, Any]) -> None:
        if len(rows["geometry"]):
            self.buffer.append(rows)
            if sum(len(r["geometry"]) for r in self.buffer) >= _FLUSH_EVERY:
                self.flush()

    def flush(self) -> None:

        if not self.buffer:
            return
        cols = {
            c: list(chain.from_iterable(r[c] for r in self.buffer))
            if self.schema.field(c).type == pa.string()
            else np.concatenate([np.asarray(r[c]) for r in self.buffer])
            for c in self.columns
        }
        geoms = np.concatenate([np.asarray(r["geometry"], dtype=object) for r in self.buffer])
        if self.multi:
            single = shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON
            geoms[single] = shapely.multipolygons(geoms[single, None])
        arrays = [pa.array(cols[c], type=self.schema.field(c).type, from_pandas=True) for c in self.columns]
        batch = pa.RecordBatch.from_arrays([*arrays, pa.array(shapely.to_wkb(geoms), pa.binary())], schema=self.schema)
        self.buffer = []
        self.n += len(geoms)
        for q in self.queues:
            _put_checked(q, batch, self._check)

    def _check(self) -> None:
        if self.errors:
            raise self.errors[0]
        if not any(t.is_alive() for t in self.threads):
            raise RuntimeError("the polygon writers stopped unexpectedly")

    def close(self) -> None:
        """Write what is buffered, end every stream and wait for the writers."""
        self.flush()
        for q in self.queues:
            _put_checked(q, None, self._check)
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]

    def abort(self) -> None:
        self._stop = True
        for q in self.queues:
            _wake(q, _ABORT)
        for t in self.threads:
            t.join()


_ABORT = object()


def _put_checked(q: Any, item: Any, check: Any) -> None:
    """``q.put(item)``, calling ``check()`` (which raises when the consumer has failed or
    stopped) before the first try and while the queue stays full."""

    while True:
        check()
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def _wake(q: Any, item: Any) -> None:
    """Empty ``q`` and leave ``item`` in it, so its consumer gets ``item`` next, whatever it was
    waiting for."""

    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            break
    try:
        q.put_nowait(item)
    except queue.Full:  # refilled meanwhile: the consumer is running and sees the stop flag
        pass


def _output_paths(out: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    outs = [out] if isinstance(out, (str, os.PathLike)) else list(out)
    if not outs:
        raise OptionError("no output file given; pass --out FILE.geojson, .gpkg or .parquet")
    paths = [Path(o) for o in outs]
    seen: set[Path] = set()
    for p in paths:
        if p.suffix.lower() not in _SUFFIXES:
            raise OptionError(
                f"unknown output format {p.suffix or '(no suffix)'!r} for {p}; use .geojson, .gpkg or .parquet"
            )
        key = p.expanduser().absolute()
        if key in seen:
            raise OptionError(f"output {p} is given twice; give each --out once")
        seen.add(key)
        check_output_file(p)
    return paths


_SUFFIXES = dict(POLYGON_FORMATS.values())


def scene_layer_name(classes: str | os.PathLike[str]) -> str:
    """The polygon layer's name: the scene's stem, read off its class raster's file name."""
    name = Path(str(classes)).name
    for suffix in (".classes.tif", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "polygons"
    return name.rsplit(".", 1)[0] or "polygons"


# --------------------------------------------------------------------------------------
# the public functions


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
    import contextlib

    from geovae.atomic import OutputSet, check_not_inputs

    layer = layer or scene_layer_name(classes)
    if out is None:
        with tempfile.TemporaryDirectory(prefix="geovae-polygons-") as tmp:
            path = Path(tmp) / "polygons.gpkg"
            write_polygons(
                classes,
                [(path, path)],
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
            return pyogrio.read_dataframe(path, layer=layer)
    paths = _output_paths(out)
    inputs = [classes, confidence, uncertainty, anomaly[0] if anomaly else None]
    check_not_inputs(paths, inputs)
    with contextlib.ExitStack() as stack:
        sets: dict[Path, OutputSet] = {}
        for p in paths:
            folder = p.parent.absolute()
            if folder not in sets:
                sets[folder] = stack.enter_context(OutputSet(folder, "polygons", lock=False, inputs=inputs))
        targets = [(p, sets[p.parent.absolute()].path(p.name)) for p in paths]
        res = write_polygons(
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
        for folder, oset in sets.items():
            oset.commit([p.name for p in paths if p.parent.absolute() == folder])
    return res


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
    progress: Any = None,
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
    _check_options(block_size, connectivity, min_area, simplify)
    finals = [Path(f) for f, _ in targets]

    src = open_raster(classes, "class raster")
    extra: list[rasterio.DatasetReader] = []
    try:
        if not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
            raise SceneError(
                f"class raster {src.name} has dtype {src.dtypes[0]}; class ids must be integers (e.g. uint8)"
            )
        crs = src.crs
        if crs is None and any(p.suffix.lower() == ".geojson" for p in finals):
            raise OptionError(f"GeoJSON needs a CRS and {src.name} has none; use .gpkg or .parquet")
        bands: dict[str, rasterio.DatasetReader] = {}
        for what, path in (
            ("confidence", confidence),
            ("uncertainty", uncertainty),
            ("reconstruction-error", anomaly[0] if anomaly else None),
        ):
            if path is not None:
                ds = open_raster(path, f"{what} raster")
                extra.append(ds)
                _check_same_grid(src, ds, what)
                bands[what] = ds
        names = {k: v["name"] for k, v in read_class_table(src).items()}
        if class_names:
            names.update({int(k): str(v) for k, v in class_names.items()})
        # Without a CRS the polygons stay in pixel units (column, row), y down.
        to_world = src.transform if crs is not None else Affine.identity()
        measure = _Measure(crs, src.bounds)
        # Every block is read once, so GDAL's block cache (5 % of RAM by default) buys
        # nothing here and would keep every block read, growing memory with the raster.
        with capped_gdal_cache(_GDAL_CACHE_BYTES):
            res = _run(
                src,
                bands,
                anomaly[1] if anomaly else None,
                targets,
                names,
                to_world,
                measure,
                min_area,
                simplify,
                block_size,
                connectivity,
                layer,
                progress,
            )
        _style_geopackages(targets, layer, read_class_table(src), names)
        return res
    finally:
        for ds in extra:
            ds.close()
        src.close()


class PolygonStream:
    """Class polygons traced while the class raster is being written.

    ``segment`` feeds each output block to :meth:`add_block` as the stitcher writes it (the
    arrays it already holds, nothing read back); a worker thread traces every finished row
    of blocks with the same engine as :func:`write_polygons`, so the polygons are those of
    vectorising the finished raster, while the model computes the next rows. On a GPU the
    CPU is otherwise idle then; on a CPU the model's threads rarely keep every core busy.
    At most ``queue_blocks`` blocks wait for the worker, however
    wide the scene: a slower worker holds the stitcher back rather than letting memory grow.

    The worker and the format writers import nothing once started (every module they use is
    imported with this one, and pyarrow's lazy imports are made first, `_load_lazy_imports`;
    with ``simplify`` the worker still calls geopandas, which is not checked): Ctrl-C or
    SIGTERM raised in the main thread at the wrong moment of an import can leave the
    interpreter's import lock held, and a thread importing after that waits forever (pyarrow
    imports ``pyarrow.pandas_compat`` on its first pandas conversion).

    Args:
        targets: ``(final path, path to write)`` per output, as :func:`write_polygons`.
        width, height, crs, transform: the class raster's grid (``crs`` None: pixel
            coordinates, as :func:`write_polygons` does for a raster without CRS).
        block: the side of the stitcher's blocks (the rows' height, for progress).
        class_names: class id -> name.
        confidence, uncertainty: whether the blocks carry these bands (averaged per polygon).
        anomaly_threshold: with a reconstruction-error band, the error above which a pixel
            counts toward ``anomaly_fraction``; None for none.
        min_area, simplify, connectivity, layer: as :func:`write_polygons`.

    Raises:
        OptionError: as :func:`write_polygons`, for its options.
    """

    def __init__(
        self,
        targets: Sequence[tuple[Path, Path]],
        *,
        width: int,
        height: int,
        crs: Any,
        transform: Affine,
        block: int,
        class_names: dict[int, str],
        confidence: bool = True,
        uncertainty: bool = False,
        anomaly_threshold: float | None = None,
        min_area: float = 0.0,
        simplify: float = 0.0,
        connectivity: Connectivity = 4,
        layer: str = "polygons",
        queue_blocks: int = 2,
    ):

        _check_options(block, connectivity, min_area, simplify)
        _load_lazy_imports()
        if crs is None and any(Path(f).suffix.lower() == ".geojson" for f, _ in targets):
            raise OptionError("GeoJSON needs a CRS and this raster has none; use .gpkg or .parquet")
        self.targets = list(targets)
        self.width, self.height, self.block = width, height, block
        self.names = dict(class_names)
        self.layer = layer
        self.threshold = anomaly_threshold
        self.rows_done = 0
        self.rows_total = math.ceil(height / block)
        self.result: VectorizeResult | None = None
        self._error: BaseException | None = None
        self._aborted = False
        self._open_row = False  # add_block is inside a row of blocks
        self._current: _BlockValues | None = None
        self._queue: Any = queue.Queue(maxsize=queue_blocks)
        bounds = rasterio.transform.array_bounds(height, width, transform)
        spec = _class_layer(
            lambda win: self._current,
            np.dtype(np.uint8),
            self.names,
            area_column(crs is None),
            connectivity,
            confidence,
            uncertainty,
            anomaly_threshold is not None,
        )
        args = (
            spec,
            width,
            height,
            crs,
            self.targets,
            transform if crs is not None else Affine.identity(),
            _Measure(crs, (bounds[0], bounds[1], bounds[2], bounds[3])),
            min_area,
            simplify,
            block,
            connectivity,
            layer,
            self._progress,
            self._rows(),
        )
        self._thread = threading.Thread(target=self._work, args=args, name="geovae-polygons", daemon=True)
        self._thread.start()

    # -- the stitcher's side -------------------------------------------------------------
    def add_block(self, window: Window, outputs: dict[str, np.ndarray]) -> None:
        """Take one written block (scene coordinates, blocks in row-major order) and its
        outputs as the stitcher wrote them (``classes``, ``confidence``, ``uncertainty``,
        ``reconstruction_error``: ``(bands, h, w)``).

        Raises:
            whatever stopped the worker (a full disk, ...), in the caller's thread.
        """
        # Only the bands the polygons use, and the entropy band alone (a view would keep the
        # mutual-information band alive in the queue too); the rest is the worker's work.
        bands = {"classes": outputs["classes"][0], "confidence": outputs["confidence"][0]}
        if "uncertainty" in outputs:
            bands["uncertainty"] = outputs["uncertainty"][0].copy()
        if self.threshold is not None:
            bands["reconstruction_error"] = outputs["reconstruction_error"][0]
        self._open_row = window.col_off + window.width < self.width
        _put_checked(self._queue, (window, bands), self._check)

    def _values(self, bands: dict[str, np.ndarray]) -> _BlockValues | None:
        classes = bands["classes"]
        valid = classes != CLASS_NODATA
        if not valid.any():
            return None
        anom = None if self.threshold is None else _anomaly_flags(bands["reconstruction_error"], self.threshold)
        return _BlockValues(classes, valid, bands["confidence"], bands.get("uncertainty"), anom)

    def _check(self) -> None:
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("the polygon worker stopped unexpectedly")

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the worker's side ---------------------------------------------------------------
    def _next(self) -> tuple[Window, dict[str, np.ndarray]] | None:
        item = self._queue.get()
        if self._aborted:
            raise _Stopped
        return item

    def _rows(self) -> Iterator[Iterator[Window]]:
        """Rows of blocks as they arrive; each block's values in ``_current`` while traced."""
        first = self._next()
        while first is not None:
            yield self._row(first)
            first = self._next()

    def _row(self, first: tuple[Window, dict[str, np.ndarray]]) -> Iterator[Window]:
        item: tuple[Window, dict[str, np.ndarray]] | None = first
        while item is not None:
            win, bands = item
            self._current = self._values(bands)
            yield win
            self._current = None
            if win.col_off + win.width >= self.width:
                return
            item = self._next()
        raise ValueError("the stream ended inside a row of blocks")

    def _progress(self, done: int, total: int) -> None:
        self.rows_done = done

    def _work(self, *args: Any) -> None:
        try:
            self.result = _run_layer(*args)
        except _Stopped:
            pass
        except BaseException as exc:
            self._error = exc
        finally:
            self._current = None

    # -- the end -------------------------------------------------------------------------
    def close(self, table: dict[int, dict[str, Any]], progress: Any = None) -> VectorizeResult:
        """Wait for the last rows, write every format, style the GeoPackages; the result.

        Args:
            table: the class table (:func:`~geovae.products.read_class_table`), for the
                GeoPackages' style.
            progress: an optional ``progress(done_rows, total_rows)``, called while waiting.
        """
        if self._open_row:
            raise ValueError("the last row of blocks is incomplete")
        _put_checked(self._queue, None, self._check)
        while self._thread.is_alive():
            self._thread.join(0.2)
            if progress is not None:
                progress(self.rows_done, self.rows_total)
        self._raise()
        assert self.result is not None
        _style_geopackages(self.targets, self.layer, table, self.names)
        return self.result

    def abort(self) -> None:
        """Stop the worker and wait for it (its temporary files are removed): after an error."""
        self._aborted = True
        _wake(self._queue, None)
        self._thread.join()


class _Stopped(Exception):
    """The worker of an aborted :class:`PolygonStream` stops."""


def _check_options(block_size: Any, connectivity: Any, min_area: float, simplify: float) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise OptionError(f"block size must be a positive number of pixels, got {block_size!r}")
    if connectivity not in CONNECTIVITIES:
        raise OptionError(f"connectivity must be 4 or 8, got {connectivity!r}")
    for name, value in (("min-area", min_area), ("simplify", simplify)):
        if not math.isfinite(value) or value < 0:
            raise OptionError(f"--{name} must be a number >= 0, got {value!r}")


def _style_geopackages(
    targets: Sequence[tuple[Path, Path]], layer: str, table: dict[int, dict[str, Any]], names: dict[int, str]
) -> None:
    """Give every GeoPackage written QGIS's default style for ``layer`` (``layer_styles``):
    categorised on ``class_name``, in the colours of the class table ``table``
    (:func:`~geovae.products.read_class_table`; a default palette where it has none)."""
    from geovae.classes import DEFAULT_COLORS
    from geovae.styles import write_layer_style

    ids = sorted(set(table) | set(names))
    colors = [table.get(c, {}).get("color") or DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i, c in enumerate(ids)]
    labels = [names.get(c) or table.get(c, {}).get("name") or f"class {c}" for c in ids]
    for final, dest in targets:
        if Path(final).suffix.lower() == ".gpkg" and ids:
            geom = pyogrio.read_info(dest, layer=layer).get("geometry_name") or "geom"
            write_layer_style(dest, layer, geom, labels, colors)


def _read_band(ds: rasterio.DatasetReader | None, win: Window) -> np.ndarray | None:
    """Band 1 of a float raster as float32 with NaN at nodata; None without the raster."""
    return None if ds is None else _read_floats(ds, win)


def _read_floats(ds: rasterio.DatasetReader, win: Window) -> np.ndarray:
    """Band 1 of a float raster as float32 with NaN at nodata."""
    a = ds.read(1, window=win, masked=False).astype(np.float32)
    if ds.nodata is not None and not np.isnan(ds.nodata):
        a = np.where(a == ds.nodata, np.nan, a)
    return a


@dataclass
class _Layer:
    """What one polygon layer is made of, for :func:`_run_layer`.

    Attributes:
        pieces: ``pieces(window) -> (geoms, keys, stats)``: the polygons of one block in
            pixel coordinates (``_block_pieces``), a key per piece (pieces of one region
            share it: a class id, or an object's name) and its ``_NSTATS`` sums and counts.
        attributes: ``attributes(keys, stats, area) -> {column: values}``, every column of
            ``columns`` but the geometry; ``class_id`` among them.
        columns: attribute columns in order (the area column named for the CRS).
        dtypes: the pandas dtype of each column.
    """

    pieces: Any
    attributes: Any
    columns: list[str]
    dtypes: dict[str, _ColumnType]


def _run(
    src: rasterio.DatasetReader,
    bands: dict[str, rasterio.DatasetReader],
    threshold: float | None,
    targets: Sequence[tuple[Path, Path]],
    names: dict[int, str],
    to_world: Affine,
    measure: _Measure,
    min_area: float,
    simplify: float,
    block_size: int,
    connectivity: int,
    layer: str,
    progress: Any,
) -> VectorizeResult:
    conf_ds, unc_ds, anom_ds = bands.get("confidence"), bands.get("uncertainty"), bands.get("reconstruction-error")

    def read(win: Window) -> _BlockValues | None:
        valid = src.read_masks(1, window=win) > 0
        if not valid.any():
            return None
        anom = None if anom_ds is None else _anomaly_flags(_read_floats(anom_ds, win), threshold)
        return _BlockValues(src.read(1, window=win), valid, _read_band(conf_ds, win), _read_band(unc_ds, win), anom)

    spec = _class_layer(
        read,
        np.dtype(src.dtypes[0]),
        names,
        area_column(src.crs is None),
        connectivity,
        conf_ds is not None,
        unc_ds is not None,
        anom_ds is not None,
    )
    return _run_layer(
        spec,
        src.width,
        src.height,
        src.crs,
        targets,
        to_world,
        measure,
        min_area,
        simplify,
        block_size,
        connectivity,
        layer,
        progress,
    )


def _anomaly_flags(err: np.ndarray, threshold: float | None) -> np.ndarray:
    """1 where the reconstruction error is above ``threshold``, 0 below, NaN at nodata."""
    return np.where(np.isnan(err), np.nan, (err > threshold).astype(np.float32))


@dataclass
class _BlockValues:
    """One block of a class raster and the bands averaged per polygon (float32, NaN at nodata;
    ``anom`` 1 above the anomaly threshold, 0 below)."""

    classes: np.ndarray
    valid: np.ndarray
    conf: np.ndarray | None = None
    unc: np.ndarray | None = None
    anom: np.ndarray | None = None


def _class_layer(
    read: Any,
    dtype: np.dtype,
    names: dict[int, str],
    area_col: str,
    connectivity: int,
    conf: bool,
    unc: bool,
    anom: bool,
) -> _Layer:
    """The class-region layer: ``read(window) -> _BlockValues | None`` (None: all nodata)
    gives the pixels, from the finished raster (:func:`_run`) or from the stitcher as it
    writes (:class:`PolygonStream`)."""
    # rasterio.features.shapes takes (u)int8/16 and int32; wider integers are narrowed.
    shapes_dtype = dtype if dtype in (np.uint8, np.uint16, np.int16, np.int32) else np.dtype(np.int32)

    def pieces(win: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        v = read(win)
        if v is None:
            return None
        data = v.classes if v.classes.dtype == shapes_dtype else v.classes.astype(shapes_dtype)
        return _block_pieces(data, v.valid, win, connectivity, v.conf, v.unc, v.anom)

    def attributes(cls: np.ndarray, stats: np.ndarray, area: np.ndarray) -> dict[str, Any]:
        nan = np.full(len(cls), np.nan)
        return {
            "class_id": cls,
            "class_name": [names.get(int(k), f"class {int(k)}") for k in cls],
            area_col: area,
            "confidence_mean": _mean(stats[:, 0], stats[:, 1]) if conf else nan,
            "uncertainty_mean": _mean(stats[:, 2], stats[:, 3]) if unc else nan,
            "anomaly_fraction": _mean(stats[:, 4], stats[:, 5]) if anom else nan,
        }

    cols = _columns(area_col)
    types: dict[str, _ColumnType] = {
        c: ("int32" if c == "class_id" else object if c == "class_name" else "float64") for c in cols
    }
    return _Layer(pieces, attributes, cols, types)


def _run_layer(
    spec: _Layer,
    width: int,
    height: int,
    crs: Any,
    targets: Sequence[tuple[Path, Path]],
    to_world: Affine,
    measure: _Measure,
    min_area: float,
    simplify: float,
    block_size: int,
    connectivity: int,
    layer: str,
    progress: Any,
    rows: Iterable[Iterable[Window]] | None = None,
) -> VectorizeResult:
    """Trace a layer block by block, join pieces across block lines, write every format.

    The engine shared by class regions and objects: pieces of one key that meet across a
    block line are joined once the row of blocks is done, and every joined polygon that
    cannot grow any further is written out (see the module docstring). ``rows`` gives the
    rows of block windows, top to bottom, each row left to right (default: squares of
    ``block_size``; a row may be a generator, so blocks can arrive while it is traced); the
    polygons do not depend on them.
    """

    geometry_type = "Polygon" if connectivity == 4 else "MultiPolygon"
    area_col = area_column(crs is None)
    a, b, c, d, e, f = to_world.a, to_world.b, to_world.c, to_world.d, to_world.e, to_world.f

    def world(geoms: np.ndarray) -> np.ndarray:
        if simplify > 0:
            # Coverage simplification needs neighbours to carry identical vertices along a
            # shared edge; one vertex per pixel step (exact integers here) guarantees it.
            geoms = shapely.segmentize(geoms, 1.0)
        return shapely.transform(
            geoms, lambda xy: np.column_stack((a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f))
        )

    # Without simplification the polygons go straight into every format as they are
    # finished (_FormatWriters). Simplification needs the whole coverage at once: the
    # polygons are then gathered in a private GeoPackage next to the first output (the same
    # disk as the outputs, which may be large), simplified, then streamed into every format.
    work: Path | None = None
    if simplify == 0:
        parts: Any = _FormatWriters(targets, crs, geometry_type, spec.columns, spec.dtypes, layer)
    else:
        work = Path(tempfile.mkdtemp(prefix=".geovae-polygons-", dir=Path(targets[0][1]).parent))
        parts_path = work / "parts.gpkg"
        parts = _PartsWriter(parts_path, crs, geometry_type, spec.columns, spec.dtypes)
    class_areas: dict[int, float] = {}

    def emit(geoms: np.ndarray, keys: np.ndarray, stats: np.ndarray) -> None:
        if len(geoms) == 0:
            return
        g = world(geoms)
        if connectivity == 8:
            # Only 8-connected regions can come out invalid: GDAL traces them with rings that
            # touch themselves at a corner. See _union_pieces for why 4-connected ones are valid.
            g = _valid(g)
        area = measure.areas(g)
        # Pixel-exact areas decide min_area, before any simplification.
        keep = (area >= min_area) & ~shapely.is_empty(g)
        g, keys, stats, area = g[keep], keys[keep], stats[keep], area[keep]
        rows = spec.attributes(keys, stats, area)
        parts.add({**rows, "geometry": g})
        if simplify == 0:
            for k, v in zip(*_group_sum(np.asarray(rows["class_id"]), area)):
                class_areas[k] = class_areas.get(k, 0.0) + v

    try:
        open_pieces = _Pieces()
        nrows = math.ceil(height / block_size)
        for irow, row in enumerate(_windows(width, height, block_size) if rows is None else rows):
            row_end = 0
            for win in row:
                row_end = win.row_off + win.height
                traced = spec.pieces(win)
                if traced is None or len(traced[0]) == 0:
                    continue
                geoms, keys, stats = traced
                x0, y0, x1, y1 = shapely.bounds(geoms).T
                c0, r0 = win.col_off, win.row_off
                c1, r1 = c0 + win.width, r0 + win.height
                # A piece is complete unless it reaches a block line shared with another block.
                on_line = ((x0 <= c0) & (c0 > 0)) | ((x1 >= c1) & (c1 < width))
                on_line |= ((y0 <= r0) & (r0 > 0)) | ((y1 >= r1) & (r1 < height))
                emit(geoms[~on_line], keys[~on_line], stats[~on_line])
                open_pieces.add(geoms[on_line], keys[on_line], stats[on_line])
                if simplify == 0:
                    parts.flush()  # to the format writers now: they work while the next block comes
            # A row of blocks is done: join what meets across its lines, and write out every
            # region that does not reach the next row (nothing below can extend it).
            geoms, keys, stats = _join(*open_pieces.take(), connectivity)
            if len(geoms):
                done = shapely.bounds(geoms)[:, 3] < row_end if row_end < height else np.ones(len(geoms), bool)
                emit(geoms[done], keys[done], stats[done])
                open_pieces.add(geoms[~done], keys[~done], stats[~done])
            if progress is not None:
                progress(irow + 1, nrows)
        if simplify == 0:
            parts.close()
            n = parts.n
        else:
            parts.flush(force=True)
            gdf = pyogrio.read_dataframe(parts_path, layer=_PARTS_LAYER)
            if len(gdf):
                tol = measure.tolerance(simplify)
                geoms = shapely.coverage_simplify(gdf.geometry.values, tol)
                geoms = _valid(np.asarray(geoms, dtype=object))
                gdf = gdf.set_geometry(geoms)
                gdf = gdf[~shapely.is_empty(geoms)].reset_index(drop=True)
                gdf[area_col] = measure.areas(gdf.geometry.values)
                for k, v in zip(*_group_sum(gdf["class_id"].to_numpy(), gdf[area_col].to_numpy())):
                    class_areas[k] = v
            n = len(gdf)
            # The simplified polygons replace the parts file, which is streamed into each
            # format one batch at a time.
            parts_path.unlink()
            pyogrio.write_dataframe(
                gdf,
                parts_path,
                driver="GPKG",
                layer=_PARTS_LAYER,
                geometry_type=geometry_type,
                promote_to_multi=geometry_type == "MultiPolygon",
            )
            for final, dest in targets:
                _write_output(parts_path, Path(final), Path(dest), crs, geometry_type, layer)
    except BaseException:
        if simplify == 0:
            parts.abort()
        raise
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return VectorizeResult(
        paths=[Path(f) for f, _ in targets],
        n_polygons=n,
        class_areas_m2=dict(sorted(class_areas.items())),
        area_unit=area_col[5:],
    )


def _mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """sum / count, NaN (written as null) where a polygon has no valid pixel."""
    out = np.full(len(sums), np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


def _group_sum(keys: np.ndarray, values: np.ndarray) -> tuple[list[int], list[float]]:
    uniq, inv = np.unique(keys, return_inverse=True)
    return [int(k) for k in uniq], np.bincount(inv, weights=values, minlength=len(uniq)).tolist()
