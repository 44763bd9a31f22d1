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
from dataclasses import dataclass, field
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
from geovae.errors import OptionError
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
from geovae.products import (
    BLOCKSIZE as _BLOCKSIZE,
)
from geovae.styles import write_class_aux
from geovae.tiling import Tile, TileGrid, blend_weights

__all__ = ["CLASS_NODATA", "PixelAreas", "Stitcher", "block_side", "check_rows", "write_cog"]


def block_side(block_size: int, step: int) -> int:
    """Side in pixels of the output blocks a :class:`Stitcher` makes for ``block_size``.

    Blocks are whole multiples of the tile step, so tile origins fall on the block grid.
    Among the multiples within a factor 2 of ``block_size`` it prefers one that is also a
    multiple of the 256-pixel output tiling, so every block write covers whole GeoTIFF tiles
    and GDAL never has to keep (or re-compress) a half-written tile.

    Args:
        block_size: the wanted block side in pixels (the ``block_size`` option).
        step: the tile step, ``tile - overlap``.

    Returns:
        The block side ``k * step`` (``k >= 1``).
    """
    want = max(1.0, block_size / step)
    cands = [k for k in range(max(1, int(want / 2)), int(want * 2) + 1) if (k * step) % _BLOCKSIZE == 0]
    if cands:
        return step * min(cands, key=lambda k: (abs(k * step - block_size), k))
    return step * max(1, round(want))


def check_rows(rows: tuple[int, int] | None, height: int, block: int) -> tuple[int, int]:
    """Validate a row range of the outputs: it must start and end on the block grid.

    Args:
        rows: ``(start, stop)`` output rows, or None for all of them.
        height: scene height in pixels.
        block: the block side (:func:`block_side`).

    Returns:
        ``(start, stop)``; ``(0, height)`` for None.

    Raises:
        OptionError: if the range is empty, outside the scene or off the block grid.
    """
    if rows is None:
        return 0, height
    start, stop = (int(r) for r in rows)
    if not 0 <= start < stop <= height:
        raise OptionError(f"rows {start}:{stop}: must be a non-empty range inside the scene's {height} rows")
    if start % block or (stop % block and stop != height):
        raise OptionError(
            f"rows {start}:{stop}: must start and end on the {block}-row output block grid "
            "(or end at the scene's last row); see geovae.stitch.block_side"
        )
    return start, stop


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


@dataclass
class _Block:
    bi: int
    bj: int
    tiles: list[Tile] = field(default_factory=list)


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
        block_size: approximate output block side; rounded with :func:`block_side`.
        overviews: give the COG outputs overviews.
        rows: ``(start, stop)`` scene rows to write, on the block grid (:func:`check_rows`);
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
        self.prob_channels = list(probabilities) if probabilities else []
        self.prob_tags = dict(probability_tags or {})
        self.info = info
        self.K = info.num_classes
        self.uncertainty = uncertainty
        self.reconstruction = reconstruction
        self.overview = overviews
        self.H, self.W = grid.height, grid.width
        self.B = block_side(block_size, grid.step)
        self.k = self.B // grid.step
        self.O = grid.overlap
        self.rows = check_rows(rows, self.H, self.B)
        self.E = self.B + self.O
        self.nbr = math.ceil(self.H / self.B)
        self.nbc = math.ceil(self.W / self.B)
        # channel layout of an accumulator: K weighted probabilities, the weight, extras
        self.c_w = self.K
        self.c_ent = self.K + 1 if uncertainty else None
        self.c_rec = self.K + 1 + int(uncertainty) if reconstruction else None
        self.C = self.K + 1 + int(uncertainty) + int(reconstruction)
        # By (first row, first column): the tiles along the scene's top and left edges weigh
        # their edge pixels fully (TileGrid.weights).
        self.tile_weights = {
            (r, c): blend_weights(grid.tile, grid.overlap, grid.margin, first_row=r, first_col=c)
            for r in (True, False)
            for c in (True, False)
        }
        self.class_lut = np.asarray(info.class_ids, dtype=np.uint8)
        # class raster value -> class index, -1 for nodata (and values of no class)
        self._class_index = np.full(256, -1, dtype=np.int64)
        self._class_index[self.class_lut] = np.arange(self.K)
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
        self.tiles_run = 0
        self.tiles_skipped = 0
        self.blocks_written = 0
        self._stats: dict[str, _BandStats] = {}
        self.buffer_bytes = 0
        self.peak_buffer_bytes = 0
        self._blocks = self._plan()
        self.tiles_total = sum(len(b.tiles) for b in self._blocks)
        self._cur = -1  # index of the block being accumulated
        self._direct: set[int] = set()  # blocks given whole by write_block
        self._acc: np.ndarray | None = None
        self._right: np.ndarray | None = None
        self._bottom: dict[int, np.ndarray] = {}
        self._pending: list[Tile] = []
        #: Called with (window in scene coordinates, outputs) after each block is written,
        #: in write order (segment's polygon stream, geovae.vector.PolygonStream).
        self.on_block: Callable[[Window, dict[str, np.ndarray]], None] | None = None
        self._dst: dict[str, Any] = {}
        self._closed = False
        self._open_outputs(crs, transform @ Affine.translation(0, self.rows[0]))

    # -- plan ---------------------------------------------------------------------------
    def _plan(self) -> list[_Block]:
        start, stop = self.rows
        # Only tiles that touch the rows count; their blocks start at the block row of the
        # first one (whose bottom spill reaches ``start``) and are accumulated, not written,
        # above ``start``. Tiles that end above ``start`` would add nothing to the rows.
        tiles = [t for t in self.grid if t.row < stop and t.row + t.size > start]
        self._bi0 = min(t.row for t in tiles) // self.B
        last = (stop - 1) // self.B
        blocks = [_Block(bi, bj) for bi in range(self._bi0, last + 1) for bj in range(self.nbc)]
        for t in tiles:
            blocks[self._block_of(t)].tiles.append(t)
        return blocks

    def order(self) -> Iterator[Tile]:
        """Tiles in the order :meth:`add`/:meth:`skip` must receive them (block by block)."""
        for b in self._blocks:
            yield from b.tiles

    def block_tiles(self) -> Iterator[list[Tile]]:
        """The tiles of :meth:`order` grouped by output block (row by row within a block)."""
        for b in self._blocks:
            yield list(b.tiles)

    def windows(self) -> Iterator[Window]:
        """The output blocks in the order they are written, as windows in scene coordinates."""
        for b in self._blocks:
            if self._written(b):
                yield self._window(b)

    def _block_of(self, t: Tile) -> int:
        return (t.row // self.B - self._bi0) * self.nbc + t.col // self.B

    def _written(self, blk: _Block) -> bool:
        """Whether a block's rows belong to the outputs (blocks above ``rows`` only feed spill)."""
        return blk.bi * self.B >= self.rows[0]

    def memory_bound(self) -> int:
        """Upper bound of the accumulator bytes alive at once (see the module docstring)."""
        per = self.C * 4
        return per * (self.E * self.E + self.E * self.O + self.O * self.B * self.nbc)

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
    def _track(self) -> None:
        n = 0
        if self._acc is not None:
            n += self._acc.nbytes
        if self._right is not None:
            n += self._right.nbytes
        n += sum(s.nbytes for s in self._bottom.values())
        self.buffer_bytes = n
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, n)

    def _advance_to(self, b: int) -> None:
        """Finish every block before ``b`` and start block ``b``."""
        if b < self._cur:
            raise ValueError("tiles must be fed in Stitcher.order()")
        while self._cur < b:
            if self._cur >= 0:
                self._finish_block(self._cur)
            self._cur += 1
            if self._cur < len(self._blocks):
                self._start_block(self._cur)

    def _start_block(self, idx: int) -> None:
        blk = self._blocks[idx]
        acc = np.zeros((self.C, self.E, self.E), dtype=np.float32)
        if self.O:
            if blk.bj > 0 and self._right is not None:
                acc[:, :, : self.O] += self._right
            self._right = None
            below = self._bottom.pop(blk.bj, None)
            if below is not None:
                acc[:, : self.O, : self.B] += below
        self._acc = acc
        self._track()

    def _finish_block(self, idx: int) -> None:
        blk = self._blocks[idx]
        acc = self._acc
        assert acc is not None
        if self.O:
            if blk.bj + 1 < self.nbc:
                self._right = acc[:, :, self.B :].copy()
            if idx + self.nbc < len(self._blocks):
                self._bottom[blk.bj] = acc[:, self.B :, : self.B].copy()
            self._track()
        if self._written(blk):
            win = self._window(blk)
            self._put(win, self._finish(acc[:, : int(win.height), : int(win.width)]))
        self._acc = None
        self._track()

    def _window(self, blk: _Block) -> Window:
        """A block's window in scene coordinates."""
        r0, c0 = blk.bi * self.B, blk.bj * self.B
        return Window(c0, r0, min(self.B, self.W - c0), min(self.B, self.rows[1] - r0))

    def add(
        self,
        tile: Tile,
        valid: np.ndarray,
        probs: np.ndarray,
        expected_entropy: np.ndarray | None = None,
        reconstruction_error: np.ndarray | None = None,
    ) -> None:
        """Blend one tile's model outputs in.

        Args:
            tile: the tile (from :meth:`order`).
            valid: (T, T) bool, the tile's valid-data mask (invalid pixels get weight 0).
            probs: (K, T, T) float32 class probabilities.
            expected_entropy: (T, T) mean per-sample entropy, when ``uncertainty``.
            reconstruction_error: (T, T), when ``reconstruction``.
        """
        self._check_streaming()
        self._advance_to(self._block_of(tile))
        acc = self._acc
        assert acc is not None
        blk = self._blocks[self._cur]
        r, c = tile.row - blk.bi * self.B, tile.col - blk.bj * self.B
        T = tile.size
        wgt = self.tile_weights[tile.i == 0, tile.j == 0] * valid
        view = acc[:, r : r + T, c : c + T]
        view[: self.K] += probs * wgt
        view[self.c_w] += wgt
        if self.c_ent is not None:
            if expected_entropy is None:
                raise ValueError("uncertainty output needs expected_entropy for every tile")
            view[self.c_ent] += expected_entropy * wgt
        if self.c_rec is not None:
            if reconstruction_error is None:
                raise ValueError("reconstruction output needs reconstruction_error for every tile")
            view[self.c_rec] += reconstruction_error * wgt
        self.tiles_run += 1

    def skip(self, tile: Tile) -> None:
        """Record a tile that is entirely nodata (it adds nothing)."""
        self._check_streaming()
        self._advance_to(self._block_of(tile))
        self.tiles_skipped += 1

    def _check_streaming(self) -> None:
        if self._direct:
            raise ValueError("this Stitcher was given whole blocks with write_block; it takes no tiles")

    def _finish(self, acc: np.ndarray) -> dict[str, np.ndarray]:
        """The output values of one complete block from its accumulator."""
        import torch

        K = self.K
        wsum = acc[self.c_w]
        bad = wsum <= 0
        safe = np.where(bad, np.float32(1.0), wsum)
        probs = acc[:K] / safe
        # torch's max over classes is numpy's argmax and max in one pass, on every core
        # (numpy's argmax along the first axis is strided). torch and numpy both take the
        # first of tied classes.
        tp = torch.from_numpy(probs)
        conf_t, idx_t = tp.max(0)
        classes = self.class_lut[idx_t.numpy()]
        classes[bad] = CLASS_NODATA
        conf = conf_t.numpy()
        conf[bad] = np.nan
        out = {"classes": classes[None], "confidence": conf[None]}
        if self.uncertainty:
            assert self.c_ent is not None
            # In place: a fresh (K, B, B) buffer per step costs more in page faults than the logs.
            plogp = tp.clamp_min(1e-12).log_().mul_(tp)
            pe = plogp.sum(0).neg_().numpy()
            mi = np.clip(pe - acc[self.c_ent] / safe, 0.0, None)
            pe[bad] = np.nan
            mi[bad] = np.nan
            out["uncertainty"] = np.stack([pe, mi])
        if self.reconstruction:
            assert self.c_rec is not None
            rec = acc[self.c_rec] / safe
            rec[bad] = np.nan
            out["reconstruction_error"] = rec[None]
        if self.prob_channels:
            po = probs[self.prob_channels]
            po[:, bad] = np.nan
            out["object_probability"] = po
        return out

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
        if self._cur >= 0:
            raise ValueError("write_block cannot follow add/skip: a Stitcher is fed tiles or whole blocks, not both")
        r0, c0 = int(window.row_off), int(window.col_off)
        bi, bj = r0 // self.B, c0 // self.B
        idx = (bi - self._bi0) * self.nbc + bj
        if (
            r0 % self.B
            or c0 % self.B
            or not 0 <= idx < len(self._blocks)
            or not self._written(self._blocks[idx])
            or Window(c0, r0, int(window.width), int(window.height)) != self._window(self._blocks[idx])
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
                left = [i for i, b in enumerate(self._blocks) if self._written(b) and i not in self._direct]
                if left:
                    raise ValueError(f"{len(left)} output blocks were never given to write_block")
            else:
                self._advance_to(len(self._blocks))
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
        self._acc = self._right = None
        self._bottom.clear()
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
        self._acc = self._right = None
        self._bottom.clear()
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
        return {
            "tiles_total": self.tiles_total,
            "tiles_run": self.tiles_run,
            "tiles_skipped": self.tiles_skipped,
            "blocks_written": self.blocks_written,
            "block_size": self.B,
            "peak_buffer_bytes": int(self.peak_buffer_bytes),
        }
