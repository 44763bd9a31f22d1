"""Tile outputs into on-disk rasters: a :class:`~geovae.blend.Blender` whose blocks go to a
:class:`~geovae.sinks.rasters.RasterSink` and are counted (class pixels, areas, anomalies,
band statistics) on the way."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.windows import Window

from geovae.atomic import OutputSet
from geovae.blend import Blender, BlockGrid, block_side, check_rows
from geovae.blocks import Block
from geovae.model.base import ModelInfo
from geovae.products import CLASS_NODATA, output_name
from geovae.sinks.rasters import RasterSink, RasterSpec, write_cog
from geovae.sinks.statistics import StatisticsSink
from geovae.tiling import Tile, TileGrid

__all__ = ["CLASS_NODATA", "Stitcher", "block_side", "check_rows", "write_cog"]


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
        # measured on scene coordinates, whatever ``rows``
        self.counts = StatisticsSink(info, crs, transform, self.anomaly_threshold)
        self.areas = self.counts.areas
        self.class_area = self.counts.class_area
        self.class_pixels = self.counts.class_pixels
        self.class_flagged = self.counts.class_flagged
        self.blocks_written = 0
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
            self.rasters = RasterSink(self.output_set, spec, list(self.blocks.windows()), self.counts.pixels)
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
        block = Block(window, outputs)
        self.rasters.add(block)
        self.counts.add(block)
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
        return self.counts.close().bands

    def summary(self) -> dict[str, Any]:
        """Counts for the run report."""
        return {**self.blender.summary(), "blocks_written": self.blocks_written}
