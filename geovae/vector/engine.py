"""The block-wise engine every polygon layer goes through: trace, join, write.

A layer (:class:`Layer`) says how one block of it becomes polygon pieces in pixel
coordinates and what attributes a finished polygon gets; :func:`trace_layer` runs it over
the blocks of a raster with :class:`LayerOptions`. A piece that touches a block line shared
with another block is held back; once a whole row of blocks is done, held pieces of one key
that share an edge across a block line are joined (:mod:`geovae.vector.join`), and every
joined region that cannot grow any further (it does not reach the next row of blocks) is
written out. Pieces that touch no shared block line are complete the moment they are traced
and go straight to the output. So no polygon is ever cut by a block line, and memory holds
one block of pixels, the pieces along the open block lines and the output buffer, never the
whole raster.

All joining happens in pixel coordinates, where every vertex is an exact integer: pieces
from two blocks meet on bit-identical coordinates, so unions are exact. The affine transform
to the raster's CRS is applied once per finished polygon.

Simplification (``simplify`` > 0) is topology-preserving: ``shapely.coverage_simplify``
simplifies each shared edge once, so neighbours still share it. It needs the whole coverage
at once, so with ``simplify`` every polygon (densified to one vertex per pixel step, which
coverage simplification needs to see identical shared edges) is loaded into memory at the
end (gathered in a temporary GeoPackage first): memory then grows with the number of polygon
vertices. Without it, memory grows only with the open block lines while polygonising, and
every format is written as the polygons are finished (:class:`~geovae.vector.formats.FormatWriters`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import rasterio.transform
import shapely
from affine import Affine
from rasterio.windows import Window

from geovae import signals
from geovae.areas import AreaMeasure
from geovae.choices import CONNECTIVITIES, Connectivity
from geovae.errors import OptionError
from geovae.products import area_column
from geovae.vector.formats import PARTS_LAYER, ColumnType, FormatWriters, PartsWriter, write_output
from geovae.vector.join import join_pieces, valid_polygons
from geovae.vector.trace import Pieces, block_rows

__all__ = ["Layer", "LayerOptions", "OpenState", "VectorizeResult", "check_options", "trace_layer"]

#: ``pieces(window)``: the polygons of one block in pixel coordinates, a key per piece and
#: its sums and counts (:func:`~geovae.vector.trace.block_pieces`); None for none.
PieceMaker = Callable[[Window], tuple[np.ndarray, np.ndarray, np.ndarray] | None]


@dataclass
class VectorizeResult:
    """What :func:`~geovae.vector.vectorize` wrote.

    Attributes:
        paths: the output files, in the order asked for.
        n_polygons: number of polygons in each output.
        class_areas_m2: total polygon area per class id, in square metres (square pixels
            for a raster without CRS, where ``area_unit`` is ``"px"``).
        area_unit: ``"m2"``, or ``"px"`` in pixel coordinates.
        open_state: what the engine held open between rows of blocks (:class:`OpenState`).
    """

    paths: list[Path]
    n_polygons: int
    class_areas_m2: dict[int, float] = field(default_factory=dict)
    area_unit: str = "m2"
    open_state: OpenState | None = None


@dataclass
class OpenState:
    """The pieces :func:`trace_layer` holds between rows of blocks: the regions that reach the
    next row, which nothing may write yet. Updated after every row; readable from another
    thread while the engine runs (each field is one int).

    Attributes:
        rows: rows of blocks done.
        pieces: pieces (joined regions) open after the last row.
        coordinates: their coordinates (vertices of every ring).
        peak_pieces, peak_coordinates: the largest of each after any row.
    """

    rows: int = 0
    pieces: int = 0
    coordinates: int = 0
    peak_pieces: int = 0
    peak_coordinates: int = 0

    def record(self, pieces: Pieces) -> None:
        """Count what ``pieces`` (the engine's open store) holds after a row of blocks."""
        self.rows += 1
        self.pieces = sum(len(g) for g in pieces.geoms)
        self.coordinates = sum(int(shapely.get_num_coordinates(g).sum()) for g in pieces.geoms)
        self.peak_pieces = max(self.peak_pieces, self.pieces)
        self.peak_coordinates = max(self.peak_coordinates, self.coordinates)


@dataclass(frozen=True)
class Layer:
    """What one polygon layer is made of.

    Attributes:
        pieces: ``pieces(window) -> (geoms, keys, stats) | None``: the polygons of one block
            in pixel coordinates (:func:`~geovae.vector.trace.block_pieces`), a key per piece
            (pieces of one region share it: a class id, or an object's name) and its
            :data:`~geovae.vector.trace.NSTATS` sums and counts; None when the block holds none.
        attributes: ``attributes(keys, stats, area) -> {column: values}``, every column of
            ``columns`` but the geometry; ``class_id`` among them.
        columns: attribute columns in order (the area column named for the CRS).
        dtypes: the pandas dtype of each column.
    """

    pieces: PieceMaker
    attributes: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, Any]]
    columns: tuple[str, ...]
    dtypes: Mapping[str, ColumnType]


class _Measure:
    """Areas in square metres (:class:`geovae.areas.AreaMeasure`, the convention the run
    report shares) and the simplification tolerance in CRS units, for one CRS."""

    def __init__(self, crs: Any, bounds: tuple[float, float, float, float]):
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


@dataclass(frozen=True)
class LayerOptions:
    """Where and how a layer is traced and written; checked by the public functions that take
    them from a user (:func:`check_options`), trusted here.

    Attributes:
        targets: ``(final path, path to write)`` per output: the final path's suffix picks the
            format (and, for a GeoPackage, which file's other layers to keep); the data go to
            the second.
        width, height: the raster's size in pixels.
        crs: the raster's CRS; None for pixel coordinates (column, row, y down).
        transform: the raster's affine transform (unused without a CRS).
        block: side of the square blocks traced at a time, in pixels.
        min_area: polygons smaller than this (m^2; square pixels without CRS) are dropped.
        simplify: topology-preserving simplification tolerance in metres (pixels without CRS).
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours) form a region.
        layer: the layer's name.
    """

    targets: tuple[tuple[Path, Path], ...]
    width: int
    height: int
    crs: Any
    transform: Affine
    block: int = 1024
    min_area: float = 0.0
    simplify: float = 0.0
    connectivity: Connectivity = 4
    layer: str = "polygons"

    @property
    def to_world(self) -> Affine:
        """Pixel -> world coordinates: the transform, or the identity in pixel coordinates."""
        return self.transform if self.crs is not None else Affine.identity()

    @property
    def geometry_type(self) -> str:
        return "Polygon" if self.connectivity == 4 else "MultiPolygon"

    @cached_property
    def measure(self) -> _Measure:
        """Polygon areas and the simplification tolerance in this CRS (made on first use,
        which imports parts of pyproj: :class:`~geovae.vector.PolygonStream` makes it before
        its worker starts)."""
        bounds = rasterio.transform.array_bounds(self.height, self.width, self.transform)
        return _Measure(self.crs, (bounds[0], bounds[1], bounds[2], bounds[3]))


def check_options(block: Any, connectivity: Any, min_area: float, simplify: float) -> None:
    """Check a user's layer options.

    Raises:
        OptionError: a block size below 1, a connectivity other than 4 or 8, a negative or
            non-finite ``min_area`` or ``simplify``.
    """
    if not isinstance(block, int) or block < 1:
        raise OptionError(f"block size must be a positive number of pixels, got {block!r}")
    if connectivity not in CONNECTIVITIES:
        raise OptionError(f"connectivity must be 4 or 8, got {connectivity!r}")
    for name, value in (("min-area", min_area), ("simplify", simplify)):
        if not math.isfinite(value) or value < 0:
            raise OptionError(f"--{name} must be a number >= 0, got {value!r}")


def trace_layer(
    layer: Layer,
    options: LayerOptions,
    *,
    rows: Iterable[Iterable[Window]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    open_state: OpenState | None = None,
) -> VectorizeResult:
    """Trace a layer block by block, join pieces across block lines, write every format.

    Pieces of one key that meet across a block line are joined once the row of blocks is
    done, and every joined polygon that cannot grow any further is written out (see the
    module docstring).

    Args:
        layer: the layer's pieces and attributes.
        options: the raster's grid, the outputs and how to trace.
        rows: the rows of block windows, top to bottom, each row left to right (default:
            squares of ``options.block``); a row may be a generator, so blocks can arrive
            while it is traced. The polygons do not depend on them.
        progress: ``progress(done_rows, total_rows)``, called after each row of blocks.
        open_state: where to count the pieces held open between rows (a new one if None);
            the result carries it.

    Returns:
        The :class:`VectorizeResult`.

    Raises:
        OutputError, OSError: an output cannot be written; and whatever ``layer`` raises.
    """
    o = options
    width, height, simplify, connectivity = o.width, o.height, o.simplify, o.connectivity
    targets = list(o.targets)
    crs, geometry_type = o.crs, o.geometry_type
    area_col = area_column(crs is None)
    measure = o.measure
    to_world = o.to_world
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
    # finished (FormatWriters). Simplification needs the whole coverage at once: the
    # polygons are then gathered in a private GeoPackage next to the first output (the same
    # disk as the outputs, which may be large), simplified, then streamed into every format.
    columns = list(layer.columns)
    dtypes = dict(layer.dtypes)
    work: Path | None = None
    if simplify == 0:
        parts: Any = FormatWriters(targets, crs, geometry_type, columns, dtypes, o.layer)
    else:
        work = Path(tempfile.mkdtemp(prefix=".geovae-polygons-", dir=Path(targets[0][1]).parent))
        parts_path = work / "parts.gpkg"
        parts = PartsWriter(parts_path, crs, geometry_type, columns, dtypes)
    class_areas: dict[int, float] = {}
    state = open_state if open_state is not None else OpenState()

    def emit(geoms: np.ndarray, keys: np.ndarray, stats: np.ndarray) -> None:
        if len(geoms) == 0:
            return
        g = world(geoms)
        if connectivity == 8:
            # Only 8-connected regions can come out invalid: GDAL traces them with rings that
            # touch themselves at a corner. See join._union_pieces for why 4-connected ones are.
            g = valid_polygons(g)
        area = measure.areas(g)
        # Pixel-exact areas decide min_area, before any simplification.
        keep = (area >= o.min_area) & ~shapely.is_empty(g)
        g, keys, stats, area = g[keep], keys[keep], stats[keep], area[keep]
        rows = layer.attributes(keys, stats, area)
        parts.add({**rows, "geometry": g})
        if simplify == 0:
            for k, v in zip(*_group_sum(np.asarray(rows["class_id"]), area)):
                class_areas[k] = class_areas.get(k, 0.0) + v

    try:
        open_pieces = Pieces()
        nrows = math.ceil(height / o.block)
        for irow, row in enumerate(block_rows(width, height, o.block) if rows is None else rows):
            signals.check()  # a no-op in a stream's worker thread: the main thread stops it
            row_end = 0
            for win in row:
                row_end = win.row_off + win.height
                traced = layer.pieces(win)
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
            geoms, keys, stats = join_pieces(*open_pieces.take(), connectivity)
            if len(geoms):
                done = shapely.bounds(geoms)[:, 3] < row_end if row_end < height else np.ones(len(geoms), bool)
                emit(geoms[done], keys[done], stats[done])
                open_pieces.add(geoms[~done], keys[~done], stats[~done])
            state.record(open_pieces)
            if progress is not None:
                progress(irow + 1, nrows)
        if simplify == 0:
            parts.close()
            n = parts.n
        else:
            n = _simplify_and_write(parts, parts_path, measure, o, area_col, class_areas)
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
        open_state=state,
    )


def _simplify_and_write(
    parts: PartsWriter,
    parts_path: Path,
    measure: _Measure,
    options: LayerOptions,
    area_col: str,
    class_areas: dict[int, float],
) -> int:
    """Simplify the whole coverage gathered in the parts file, then stream it into every
    format; the class areas (after simplification) go into ``class_areas``. The number of
    polygons."""
    parts.flush(force=True)
    gdf = pyogrio.read_dataframe(parts_path, layer=PARTS_LAYER)
    if len(gdf):
        tol = measure.tolerance(options.simplify)
        geoms = shapely.coverage_simplify(gdf.geometry.values, tol)
        geoms = valid_polygons(np.asarray(geoms, dtype=object))
        gdf = gdf.set_geometry(geoms)
        gdf = gdf[~shapely.is_empty(geoms)].reset_index(drop=True)
        gdf[area_col] = measure.areas(gdf.geometry.values)
        for k, v in zip(*_group_sum(gdf["class_id"].to_numpy(), gdf[area_col].to_numpy())):
            class_areas[k] = v
    # The simplified polygons replace the parts file, which is streamed into each format one
    # batch at a time.
    parts_path.unlink()
    geometry_type = options.geometry_type
    pyogrio.write_dataframe(
        gdf,
        parts_path,
        driver="GPKG",
        layer=PARTS_LAYER,
        geometry_type=geometry_type,
        promote_to_multi=geometry_type == "MultiPolygon",
    )
    for final, dest in options.targets:
        write_output(parts_path, Path(final), Path(dest), options.crs, geometry_type, options.layer)
    return len(gdf)


def _group_sum(keys: np.ndarray, values: np.ndarray) -> tuple[list[int], list[float]]:
    uniq, inv = np.unique(keys, return_inverse=True)
    return [int(k) for k in uniq], np.bincount(inv, weights=values, minlength=len(uniq)).tolist()
