"""Tile outputs into on-disk rasters: a :class:`~geovae.blend.Blender` whose blocks go to a
:class:`~geovae.sinks.rasters.RasterSink` and are counted (class pixels, areas, anomalies,
band statistics) on the way."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.windows import Window

from geovae.areas import AreaMeasure
from geovae.atomic import OutputSet
from geovae.blend import Blender, BlockGrid, block_side, check_rows
from geovae.blocks import Block
from geovae.model.base import ModelInfo
from geovae.products import CLASS_NODATA, output_name
from geovae.sinks.rasters import RasterSink, RasterSpec, write_cog
from geovae.tiling import Tile, TileGrid

__all__ = ["CLASS_NODATA", "PixelAreas", "Stitcher", "block_side", "check_rows", "write_cog"]


class PixelAreas:
    """Area of pixels by class, by the convention of the polygons' ``area_m2``.

    :class:`geovae.areas.AreaMeasure` decides it: planar area in a projected CRS, geodesic
    area on the ellipsoid in a geographic one, square pixels without a CRS. Geographic pixels
    shrink towards the poles, so each block is cut into cells of ``cell`` pixels, each cell
    is measured as one polygon with the same function that measures the polygons, and the
    pixels of a cell share its mean area.

    Attributes:
        measure: the :class:`~geovae.areas.AreaMeasure` (its ``unit`` names the convention).
    """

    def __init__(self, crs: Any, transform: Affine, cell: int = 64):
        self.transform = transform
        self.cell = cell
        self.measure = AreaMeasure(crs)

    def class_areas(self, classes: np.ndarray, window: Window, nvalues: int) -> np.ndarray:
        """Area per class value (0..nvalues-1) of a block of class indexes (-1 = nodata).

        Args:
            classes: (h, w) int array of class indexes, -1 where nodata.
            window: where the block lies in the scene.
            nvalues: number of classes.

        Returns:
            float64 (nvalues,) areas in m^2 (in pixels without a CRS).
        """
        h, w = classes.shape
        if self.measure.kind == "pixel":
            return np.bincount(classes[classes >= 0].ravel(), minlength=nvalues).astype(np.float64)
        c = self.cell
        nr, nc = math.ceil(h / c), math.ceil(w / c)
        cell_id = (np.arange(h)[:, None] // c) * nc + (np.arange(w)[None, :] // c)
        ok = classes >= 0
        counts = np.bincount(cell_id[ok] * nvalues + classes[ok], minlength=nr * nc * nvalues).reshape(nr * nc, nvalues)
        r0, c0 = int(window.row_off), int(window.col_off)
        rows = np.minimum(np.arange(nr + 1) * c, h) + r0
        cols = np.minimum(np.arange(nc + 1) * c, w) + c0
        cc, rr = np.meshgrid(cols, rows)
        xs, ys = self.transform @ (cc.astype(np.float64), rr.astype(np.float64))
        used = np.flatnonzero(counts.any(1))  # cells without a valid pixel need no measuring
        a, b = used // nc, used % nc
        ring = np.stack(
            [
                np.stack([xs[a, b], xs[a, b + 1], xs[a + 1, b + 1], xs[a + 1, b]], -1),
                np.stack([ys[a, b], ys[a, b + 1], ys[a + 1, b + 1], ys[a + 1, b]], -1),
            ],
            -1,
        )
        per_pixel = np.zeros(nr * nc)
        npx = (rows[a + 1] - rows[a]) * (cols[b + 1] - cols[b])
        per_pixel[used] = self.measure.areas(shapely.polygons(ring)) / npx
        return (counts * per_pixel[:, None]).sum(0)


class _BandStats:
    """Running minimum, maximum, sum, sum of squares and counts of each band of one output."""

    def __init__(self, bands: int):
        self.lo = np.full(bands, np.inf)
        self.hi = np.full(bands, -np.inf)
        self.sum = np.zeros(bands)
        self.sq = np.zeros(bands)
        self.n = np.zeros(bands, dtype=np.int64)
        self.total = 0

    def add(self, values: np.ndarray, nodata: int | None) -> None:
        self.total += values[0].size
        for b, v in enumerate(values):
            ok = v != nodata if nodata is not None else ~np.isnan(v)
            x = v[ok].astype(np.float64)
            if x.size:
                self.lo[b] = min(self.lo[b], x.min())
                self.hi[b] = max(self.hi[b], x.max())
                self.sum[b] += x.sum()
                self.sq[b] += np.dot(x, x)
                self.n[b] += x.size

    def result(self) -> list[dict[str, float | None]]:
        out = []
        for b in range(len(self.n)):
            n = int(self.n[b])
            mean = self.sum[b] / n if n else None
            std = math.sqrt(max(self.sq[b] / n - mean * mean, 0.0)) if mean is not None else None
            out.append(
                {
                    "minimum": float(self.lo[b]) if n else None,
                    "maximum": float(self.hi[b]) if n else None,
                    "mean": mean,
                    "stddev": std,
                    "valid_percent": 100.0 * n / self.total if self.total else 0.0,
                }
            )
        return out


class Stitcher:
    """Blend tile outputs into output blocks and write each block once it is complete.

    Feed every tile of :meth:`order` in that order, with :meth:`add` (model outputs) or
    :meth:`skip` (an all-nodata tile), then call :meth:`close`. On error call :meth:`abort`.
    Alternatively, give every block's finished values with :meth:`write_block` (outputs
    computed elsewhere, e.g. row bands of one scene on several machines), then :meth:`close`.

    With ``rows``, the outputs cover only those rows of the scene (their transform shifted
    to match): :meth:`order` then holds just the tiles that touch them, on the scene's own
    tile and block grid, so the rows equal the same rows of a whole-scene run bit for bit.

    Args:
        grid: the tile grid.
        out_dir: folder of the outputs.
        stem: output name stem.
        info: the model description (class ids, names, colours).
        crs: CRS of the outputs (None in pixel-coordinate mode).
        transform: geotransform of the outputs.
        uncertainty: write ``<stem>.uncertainty.tif`` (tile outputs carry expected entropy).
        reconstruction: write ``<stem>.reconstruction-error.tif``.
        block_size: approximate output block side; rounded with :func:`geovae.blend.block_side`.
        overviews: give the COG outputs overviews.
        rows: ``(start, stop)`` scene rows to write, on the block grid (:func:`geovae.blend.check_rows`);
            None for the whole scene.
        output_set: the run's :class:`~geovae.atomic.OutputSet`: the rasters are written into
            it and moved into place with the rest of the run. None makes a private set in
            ``out_dir`` that :meth:`close` commits (the rasters appear together).
        anomaly_threshold: with ``reconstruction``, count the pixels whose reconstruction
            error is above this value, per class (:attr:`class_flagged`): the trust check's
            flagged fraction.
        probabilities: channel indices whose blended probabilities are written as
            ``<stem>.object-probability.tif``, one band each (what ``--objects`` splits
            objects with); None writes none.
        probability_tags: tags of that raster (:func:`geovae.objects.probability_tags`).
    """

    def __init__(
        self,
        grid: TileGrid,
        out_dir: Path,
        stem: str,
        info: ModelInfo,
        crs: Any,
        transform: Affine,
        *,
        uncertainty: bool = False,
        reconstruction: bool = False,
        block_size: int = 1024,
        overviews: bool = True,
        rows: tuple[int, int] | None = None,
        output_set: OutputSet | None = None,
        anomaly_threshold: float | None = None,
        probabilities: list[int] | None = None,
        probability_tags: dict[str, str] | None = None,
    ):
        self.grid = grid
        self.blocks = BlockGrid(grid, block_size, rows)
        self.prob_channels = list(probabilities) if probabilities else []
        self.prob_tags = dict(probability_tags or {})
        self.blender = Blender(
            self.blocks, info, uncertainty=uncertainty, reconstruction=reconstruction, probabilities=self.prob_channels
        )
        self.info = info
        self.K = info.num_classes
        self.uncertainty = uncertainty
        self.reconstruction = reconstruction
        self.overview = overviews
        self.H, self.W = grid.height, grid.width
        self.B = self.blocks.side
        self.rows = self.blocks.rows
        self.nbr = math.ceil(self.H / self.B)
        self.nbc = self.blocks.block_cols
        self.C = self.blender.channels
        # class raster value -> class index, -1 for nodata (and values of no class)
        self._class_index = np.full(256, -1, dtype=np.int64)
        self._class_index[np.asarray(info.class_ids, dtype=np.uint8)] = np.arange(self.K)
        self.out_dir, self.stem = Path(out_dir), stem
        kinds = ["classes", "confidence"] + ["uncertainty"] * uncertainty + ["reconstruction_error"] * reconstruction
        kinds += ["object_probability"] * bool(self.prob_channels)
        self.names = {k: output_name(stem, k) for k in kinds}
        self._own_set = output_set is None
        self.output_set = output_set if output_set is not None else OutputSet(out_dir, stem, lock=False)
        if self._own_set:
            self.output_set.open()
        self.paths = {k: self.output_set.final(n) for k, n in self.names.items()}
        self.anomaly_threshold = anomaly_threshold if reconstruction else None
        self.areas = PixelAreas(crs, transform)  # measured on scene coordinates, whatever ``rows``
        self.class_area = np.zeros(self.K, dtype=np.float64)
        self.class_pixels = np.zeros(self.K, dtype=np.int64)
        self.class_flagged = np.zeros(self.K, dtype=np.int64)
        self.blocks_written = 0
        self._stats: dict[str, _BandStats] = {}
        self.tiles_total = self.blocks.tiles_total
        self._fed = False
        self._direct: set[int] = set()  # blocks given whole by write_block
        #: Called with (window in scene coordinates, outputs) after each block is written,
        #: in write order (segment's polygon stream, geovae.vector.PolygonStream).
        self.on_block: Callable[[Window, dict[str, np.ndarray]], None] | None = None
        self._closed = False
        spec = RasterSpec.of_run(
            stem,
            info,
            width=self.W,
            rows=self.rows,
            crs=crs,
            transform=transform,
            uncertainty=uncertainty,
            reconstruction=reconstruction,
            anomaly_threshold=self.anomaly_threshold,
            probabilities=self.prob_channels,
            probability_tags=self.prob_tags,
            overviews=overviews,
        )
        try:
            self.rasters = RasterSink(self.output_set, spec, list(self.blocks.windows()), self.class_pixels.tolist)
        except BaseException:
            if self._own_set:
                self.output_set.close()
            raise

    @property
    def tiles_run(self) -> int:
        return self.blender.tiles_run

    @property
    def tiles_skipped(self) -> int:
        return self.blender.tiles_skipped

    def order(self) -> Iterator[Tile]:
        """Tiles in the order :meth:`add`/:meth:`skip` must receive them (block by block)."""
        return self.blocks.order()

    def block_tiles(self) -> Iterator[list[Tile]]:
        """The tiles of :meth:`order` grouped by output block (row by row within a block)."""
        return self.blocks.block_tiles()

    def windows(self) -> Iterator[Window]:
        """The output blocks in the order they are written, as windows in scene coordinates."""
        return self.blocks.windows()

    def memory_bound(self) -> int:
        """Upper bound of the accumulator bytes alive at once (see :mod:`geovae.blend`)."""
        return self.blender.memory_bound()

    # -- streaming ----------------------------------------------------------------------
    def add(
        self,
        tile: Tile,
        valid: np.ndarray,
        probs: np.ndarray,
        expected_entropy: np.ndarray | None = None,
        reconstruction_error: np.ndarray | None = None,
    ) -> None:
        """Blend one tile's model outputs in (:meth:`geovae.blend.Blender.add`)."""
        self._check_streaming()
        for block in self.blender.add(tile, valid, probs, expected_entropy, reconstruction_error):
            self._put(block.window, dict(block.arrays))

    def skip(self, tile: Tile) -> None:
        """Record a tile that is entirely nodata (it adds nothing)."""
        self._check_streaming()
        for block in self.blender.skip(tile):
            self._put(block.window, dict(block.arrays))

    def _check_streaming(self) -> None:
        if self._direct:
            raise ValueError("this Stitcher was given whole blocks with write_block; it takes no tiles")
        self._fed = True

    def _put(self, window: Window, outputs: dict[str, np.ndarray]) -> None:
        """Write one block's outputs (window in scene coordinates) and count its classes."""
        self.rasters.add(Block(window, outputs))
        for kind, vals in outputs.items():
            self._stats.setdefault(kind, _BandStats(vals.shape[0])).add(
                vals, CLASS_NODATA if kind == "classes" else None
            )
        idx = self._class_index[outputs["classes"][0]]
        ok = idx >= 0
        self.class_pixels += np.bincount(idx[ok].ravel(), minlength=self.K)
        if self.anomaly_threshold is not None:
            flagged = ok & (outputs["reconstruction_error"][0] > self.anomaly_threshold)
            self.class_flagged += np.bincount(idx[flagged].ravel(), minlength=self.K)
        self.class_area += self.areas.class_areas(idx, window, self.K)
        self.blocks_written += 1
        if self.on_block is not None:
            self.on_block(window, outputs)

    def write_block(self, window: Window, outputs: dict[str, np.ndarray]) -> None:
        """Write the finished values of one output block, instead of feeding its tiles.

        For outputs computed elsewhere, e.g. the row bands of one scene segmented on several
        machines (:mod:`geovae.batch`), written here with the same creation options, colour
        table, tags and overviews, and counted into the class pixels and areas in the same
        block order as a streamed run. Give every block, then call :meth:`close`.

        Args:
            window: one block of this stitcher, in scene coordinates (row and column offsets
                multiples of the block side, size clipped at the scene edge).
            outputs: the block's values keyed by kind (every output this stitcher writes),
                each ``(bands, h, w)`` in that output's dtype.

        Raises:
            ValueError: if tiles were fed, the window is not one of this stitcher's blocks,
                or an output is missing.
        """
        if self._fed:
            raise ValueError("write_block cannot follow add/skip: a Stitcher is fed tiles or whole blocks, not both")
        r0, c0 = int(window.row_off), int(window.col_off)
        grid = self.blocks
        idx = (r0 // self.B - grid.first_row) * self.nbc + c0 // self.B
        if (
            r0 % self.B
            or c0 % self.B
            or not 0 <= idx < len(grid.blocks)
            or not grid.written(grid.blocks[idx])
            or Window(c0, r0, int(window.width), int(window.height)) != grid.window(grid.blocks[idx])
        ):
            raise ValueError(f"{window} is not an output block of this stitcher (block side {self.B})")
        missing = set(self.names) - set(outputs)
        if missing:
            raise ValueError(f"write_block needs every output; missing {sorted(missing)}")
        self._direct.add(idx)
        self._put(window, outputs)

    # -- end ----------------------------------------------------------------------------
    def close(self, progress: Any = None) -> dict[str, Path]:
        """Write the remaining blocks and copy each raster into a COG; commit them if the set is private.

        Args:
            progress: an optional callable ``progress(done, total)`` called about twice a
                second while the COGs are written, in bytes (an estimate from the files'
                sizes: rasterio passes no progress callback to GDAL's copy).

        Returns:
            Final paths of the rasters, keyed by kind (in the run's output set, they appear
            there when the run commits).
        """
        if self._closed:
            return dict(self.paths)
        try:
            if self._direct:
                # Blocks given whole: a block never given would silently be left empty.
                grid = self.blocks
                left = [i for i, b in enumerate(grid.blocks) if grid.written(b) and i not in self._direct]
                if left:
                    raise ValueError(f"{len(left)} output blocks were never given to write_block")
            else:
                for block in self.blender.finish():
                    self._put(block.window, dict(block.arrays))
            self.files = self.rasters.close(progress)
            if self._own_set:
                self.output_set.commit(list(self.names.values()))
                self.output_set.close()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.blender.release()
        return dict(self.paths)

    def abort(self) -> None:
        """Close and delete every unfinished output (after an error or interruption)."""
        self.rasters.abort()
        if self._own_set:
            self.output_set.close()
        self.blender.release()
        self._closed = True

    def statistics(self) -> dict[str, list[dict[str, float | None]]]:
        """Exact statistics of every output band, gathered block by block as they were written.

        Returns:
            Per kind, one dict per band: ``minimum``, ``maximum``, ``mean``, ``stddev``
            (None where a band has no valid pixel) and ``valid_percent`` (0..100), as the STAC
            raster extension names them.
        """
        return {k: st.result() for k, st in self._stats.items()}

    def summary(self) -> dict[str, Any]:
        """Counts for the run report."""
        return {**self.blender.summary(), "blocks_written": self.blocks_written}
