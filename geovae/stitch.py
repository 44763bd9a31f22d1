"""Streaming accumulation of blended tile outputs into on-disk rasters.

The scene is cut into square output blocks of ``k * step`` pixels (``step = tile - overlap``),
so tile origins fall on the same grid as block origins. Each block owns the tiles whose
origin lies inside it; those tiles reach at most ``overlap`` pixels past the block's right
and bottom edges. Tiles are fed block by block in raster order, so when the last tile of a
block is in, the block is complete except for what its own tiles spill onward:

* the right spill strip (``overlap`` columns) goes to the next block of the same row;
* the bottom spill strip (``overlap`` rows) waits for the block below.

Only one block accumulator, one right strip and one row of bottom strips are alive at a
time: peak memory is ``channels * 4 B * ((B + o)^2 + (B + o) * o + o * W)`` for block side
``B``, overlap ``o`` and scene width ``W`` (the bottom strips, a few MB per 10k pixels of
width), and never depends on the scene's height or on its pixel count.

Outputs (names, profiles and tags from :mod:`geovae.products`) are Cloud Optimized
GeoTIFFs: 256 x 256 tiles, ZSTD with a predictor, overviews, same CRS/transform/shape as the
scene. A COG keeps its overviews' tiles before the full-resolution ones, which a file
written block by block cannot: so the blocks stream into a tiled GeoTIFF in the run's
staging folder (:meth:`~geovae.atomic.OutputSet.scratch`, fast ZSTD level), and
:meth:`Stitcher.close` has GDAL's COG driver copy it into the output, building the overviews
on the way (mode for classes, average for the rest), block by block in GDAL's capped cache,
so memory stays flat with the scene's size. The scratch file is removed after the copy. Every
output is written into an :class:`~geovae.atomic.OutputSet` and moved into place with the
rest of the run:

* ``<stem>.classes.tif``: uint8 class ids, nodata **255** (so class ids must be 0..254), a
  colour table, class names as ``CLASS_<id>`` tags and a ``CLASSES`` JSON tag;
* ``<stem>.confidence.tif``: float32 max blended probability, nodata NaN;
* ``<stem>.uncertainty.tif`` (with samples): band 1 predictive entropy of the blended mean
  probabilities (nats), band 2 mutual information (predictive entropy minus the blended
  expected entropy, clipped at 0), nodata NaN;
* ``<stem>.reconstruction-error.tif`` (with reconstruction): float32, nodata NaN.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geovae.areas import AreaMeasure
from geovae.atomic import OutputSet
from geovae.blend import Blender, BlockGrid, block_side, check_rows
from geovae.model.base import ModelInfo
from geovae.products import (
    BAND_DESCRIPTIONS,
    CLASS_NODATA,
    cog_options,
    output_name,
    raster_profile,
    uncertainty_tags,
    write_class_table,
)
from geovae.styles import write_class_aux
from geovae.tiling import Tile, TileGrid

__all__ = ["CLASS_NODATA", "PixelAreas", "Stitcher", "block_side", "check_rows", "write_cog"]


def write_cog(src: str | Path, dst: str | Path, kind: str, *, overviews: bool = True) -> Path:
    """Copy a tiled GeoTIFF into a Cloud Optimized GeoTIFF of output raster ``kind``.

    GDAL's COG driver builds the overviews (:func:`geovae.products.overview_resampling`) into
    a temporary file next to ``dst`` and writes the COG block by block, all through GDAL's
    block cache (capped during a run), so memory does not grow with the raster. The colour
    table, nodata, tags and band descriptions are copied.

    Args:
        src: the tiled GeoTIFF (a run's scratch file).
        dst: the COG to write.
        kind: one of :data:`geovae.products.RASTER_KINDS`.
        overviews: give the COG overviews.

    Returns:
        ``dst``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        rasterio.shutil.copy(
            str(src), str(dst), driver="COG", **cog_options(kind, overviews=overviews, threads=cog_threads())
        )
    return Path(dst)


def cog_threads() -> int | None:
    """Threads for the COG copy's compression: the run's CPU budget, torch's thread count
    (which ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` set), since the copy runs after
    the model has finished with those cores; on 2 cores that halves the copy of a 2048² run's
    two COGs against one thread. None when the user set GDAL's own ``GDAL_NUM_THREADS``, which
    GDAL then applies."""
    import os

    import rasterio.env
    import torch

    if os.environ.get("GDAL_NUM_THREADS") or (rasterio.env.hasenv() and "GDAL_NUM_THREADS" in rasterio.env.getenv()):
        return None
    return torch.get_num_threads()


class _Watch:
    """Report the bytes a GDAL copy into ``dst`` has written so far, from a thread, about
    twice a second; does nothing without ``report``."""

    def __init__(self, dst: Path, report: Any, every: float = 0.5):
        self.files = [dst, dst.with_name(dst.name + ".ovr.tmp")]
        self.report, self.every = report, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        n = 0
        for f in self.files:
            with contextlib.suppress(OSError):
                n += f.stat().st_size
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.report(self._size())

    def __enter__(self) -> _Watch:
        if self.report is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


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
        self._dst: dict[str, Any] = {}
        self._closed = False
        self._open_outputs(crs, transform @ Affine.translation(0, self.rows[0]))

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

    # -- outputs ------------------------------------------------------------------------
    def _open_outputs(self, crs: Any, transform: Affine) -> None:
        size = dict(width=self.W, height=self.rows[1] - self.rows[0], crs=crs, transform=transform)
        try:
            for kind, name in self.names.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    count = len(self.prob_channels) if kind == "object_probability" else None
                    ds = rasterio.open(
                        self.output_set.scratch(name), "w", **raster_profile(kind, **size, stream=True, count=count)
                    )
                self._dst[kind] = ds
                texts = BAND_DESCRIPTIONS[kind]
                if kind == "object_probability":
                    texts = tuple(f"probability of {self.info.class_names[c]}" for c in self.prob_channels)
                    ds.update_tags(**self.prob_tags)
                for b, text in enumerate(texts, start=1):
                    ds.set_band_description(b, text)
        except Exception:
            self.abort()
            raise
        write_class_table(self._dst["classes"], self.info.class_ids, self.info.class_names, self.info.class_colors)
        if self.uncertainty:
            self._dst["uncertainty"].update_tags(**uncertainty_tags(self.K))
        if self.anomaly_threshold is not None:
            self._dst["reconstruction_error"].update_tags(ANOMALY_THRESHOLD=repr(float(self.anomaly_threshold)))

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
        file_win = Window(window.col_off, window.row_off - self.rows[0], window.width, window.height)
        for kind, ds in self._dst.items():
            ds.write(outputs[kind], window=file_win)
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
        missing = set(self._dst) - set(outputs)
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
            for ds in self._dst.values():
                ds.close()
            self._write_cogs(progress)
            if self._own_set:
                self.output_set.commit(list(self.names.values()))
                self.output_set.close()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.blender.release()
        return dict(self.paths)

    def _write_cogs(self, progress: Any) -> None:
        scratch = {k: self.output_set.scratch(self.names[k]) for k in self._dst}
        # What one copy writes, roughly: the overviews' temporary file (a third of the image)
        # and the COG (the image and its overviews): 5/3 of the scratch file.
        expect = {k: max(1, p.stat().st_size * 5 // 3) for k, p in scratch.items()}
        total, done = sum(expect.values()), 0
        for kind, src in scratch.items():
            dst = self.output_set.path(self.names[kind])
            report = None
            if progress is not None:

                def report(n: int, d: int = done, e: int = expect[kind]) -> None:
                    progress(d + min(n, e), total)

            with _Watch(dst, report):
                write_cog(src, dst, kind, overviews=self.overview)
            src.unlink()
            if kind == "classes":
                # Category names, attribute table and the exact colour table, in GDAL's sidecar
                # (geovae.styles): rasterio cannot write them into the GeoTIFF.
                write_class_aux(
                    dst, self.info.class_ids, self.info.class_names, self.info.class_colors, self.class_pixels.tolist()
                )
            done += expect[kind]
            if progress is not None:
                progress(done, total)

    def abort(self) -> None:
        """Close and delete every unfinished output (after an error or interruption)."""
        for kind, ds in list(self._dst.items()):
            try:
                ds.close()
            except Exception:  # pragma: no cover - closing a broken dataset
                pass
            if not self._closed:
                self.output_set.path(self.names[kind]).unlink(missing_ok=True)
                self.output_set.scratch(self.names[kind]).unlink(missing_ok=True)
        self._dst.clear()
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
