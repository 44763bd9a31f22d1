"""Blending tile outputs into output blocks: the block grid and the :class:`Blender` source.

The scene is cut into square output blocks of ``k * step`` pixels (``step = tile - overlap``),
so tile origins fall on the same grid as block origins (:class:`BlockGrid`). Each block owns
the tiles whose origin lies inside it; those tiles reach at most ``overlap`` pixels past the
block's right and bottom edges. Tiles are fed block by block in raster order, so when the
last tile of a block is in, the block is complete except for what its own tiles spill
onward:

* the right spill strip (``overlap`` columns) goes to the next block of the same row;
* the bottom spill strip (``overlap`` rows) waits for the block below.

Only one block accumulator, one right strip and one row of bottom strips are alive at a
time: peak memory is ``channels * 4 B * ((B + o)^2 + (B + o) * o + o * W)`` for block side
``B``, overlap ``o`` and scene width ``W`` (the bottom strips, a few MB per 10k pixels of
width), and never depends on the scene's height or on its pixel count.

A complete block is finished (blended probabilities -> classes, confidence, uncertainty,
reconstruction error, object probabilities) and handed on as a :class:`~geovae.blocks.Block`
in write order; the sinks (:mod:`geovae.sinks`, the polygon stream) write, count and trace
it. Nothing here touches a file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rasterio.windows import Window

from geovae.blocks import Block
from geovae.classes import CLASS_NODATA
from geovae.errors import OptionError
from geovae.model.base import ModelInfo
from geovae.products import BLOCKSIZE
from geovae.tiling import Tile, TileGrid, blend_weights

__all__ = ["Blender", "BlockGrid", "block_side", "check_rows"]


def block_side(block_size: int, step: int) -> int:
    """Side in pixels of the output blocks a :class:`BlockGrid` makes for ``block_size``.

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
    cands = [k for k in range(max(1, int(want / 2)), int(want * 2) + 1) if (k * step) % BLOCKSIZE == 0]
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
            "(or end at the scene's last row); see geovae.blend.block_side"
        )
    return start, stop


@dataclass
class OutputBlock:
    """One block of the grid: its row and column among the blocks, and the tiles it owns."""

    row: int
    col: int
    tiles: list[Tile] = field(default_factory=list)


class BlockGrid:
    """The output blocks over a tile grid, in write order, and the tiles each one owns.

    With ``rows``, the outputs cover only those rows of the scene: the grid then holds just
    the tiles that touch them, on the scene's own tile and block grid (blocks above
    ``rows`` only gather the spill of their tiles and are not written), so the rows equal the
    same rows of a whole-scene run bit for bit.

    Args:
        tiles: the tile grid.
        block_size: approximate block side; rounded with :func:`block_side`.
        rows: ``(start, stop)`` scene rows to write, on the block grid; None for the whole scene.

    Raises:
        OptionError: ``rows`` off the block grid (:func:`check_rows`).

    Attributes:
        side: the block side in pixels.
        rows: ``(start, stop)`` rows of the outputs.
        block_cols: blocks per row of blocks.
        tiles_total: tiles the blocks own (what a run feeds).
    """

    def __init__(self, tiles: TileGrid, block_size: int, rows: tuple[int, int] | None = None):
        self.tiles = tiles
        self.height, self.width = tiles.height, tiles.width
        self.side = block_side(block_size, tiles.step)
        self.rows = check_rows(rows, self.height, self.side)
        self.block_cols = math.ceil(self.width / self.side)
        start, stop = self.rows
        # Only tiles that touch the rows count; their blocks start at the block row of the
        # first one (whose bottom spill reaches ``start``) and are accumulated, not written,
        # above ``start``. Tiles that end above ``start`` would add nothing to the rows.
        owned = [t for t in tiles if t.row < stop and t.row + t.size > start]
        self.first_row = min(t.row for t in owned) // self.side
        last = (stop - 1) // self.side
        self.blocks = [OutputBlock(r, c) for r in range(self.first_row, last + 1) for c in range(self.block_cols)]
        for t in owned:
            self.blocks[self.index_of(t)].tiles.append(t)
        self.tiles_total = len(owned)

    @property
    def whole_scene(self) -> bool:
        """Whether the outputs cover every row of the scene."""
        return self.rows == (0, self.height)

    def index_of(self, tile: Tile) -> int:
        """Index in :attr:`blocks` of the block that owns ``tile``."""
        return (tile.row // self.side - self.first_row) * self.block_cols + tile.col // self.side

    def written(self, block: OutputBlock) -> bool:
        """Whether a block's rows belong to the outputs (blocks above ``rows`` only feed spill)."""
        return block.row * self.side >= self.rows[0]

    def window(self, block: OutputBlock) -> Window:
        """A block's window in scene coordinates, clipped at the outputs' edge."""
        r0, c0 = block.row * self.side, block.col * self.side
        return Window(c0, r0, min(self.side, self.width - c0), min(self.side, self.rows[1] - r0))

    def order(self) -> Iterator[Tile]:
        """Tiles in the order a :class:`Blender` must receive them (block by block)."""
        for b in self.blocks:
            yield from b.tiles

    def block_tiles(self) -> Iterator[list[Tile]]:
        """The tiles of :meth:`order` grouped by output block (row by row within a block)."""
        for b in self.blocks:
            yield list(b.tiles)

    def windows(self) -> Iterator[Window]:
        """The output blocks in write order, as windows in scene coordinates."""
        for b in self.blocks:
            if self.written(b):
                yield self.window(b)


class Blender:
    """Blend tile outputs into blocks; hand out each block once it is complete.

    Feed every tile of :meth:`BlockGrid.order` in that order, with :meth:`add` (model
    outputs) or :meth:`skip` (an all-nodata tile); each call returns the blocks it completed,
    in write order, and :meth:`finish` the rest.

    Args:
        blocks: the block grid.
        info: the model description (class ids).
        uncertainty: tile outputs carry the expected entropy; blocks get ``uncertainty``
            (predictive entropy, mutual information).
        reconstruction: tile outputs carry the reconstruction error; blocks get ``reconstruction_error``.
        probabilities: channel indices whose blended probabilities blocks carry as
            ``object_probability``, one band each (what ``--objects`` splits objects with).
        maps: the number of object maps tile outputs carry (``object_maps``, a model with
            object heads), blended and appended to ``object_probability`` after the
            probabilities.
    """

    def __init__(
        self,
        blocks: BlockGrid,
        info: ModelInfo,
        *,
        uncertainty: bool = False,
        reconstruction: bool = False,
        probabilities: Sequence[int] = (),
        maps: int = 0,
    ):
        self.blocks = blocks
        tiles = blocks.tiles
        self.num_classes = info.num_classes
        self.uncertainty = uncertainty
        self.reconstruction = reconstruction
        self.probabilities = list(probabilities)
        self.overlap = tiles.overlap
        self.extent = blocks.side + self.overlap  # an accumulator: the block and its spill
        # channel layout of an accumulator: the weighted probabilities, the weight, extras
        self.weight_channel = self.num_classes
        self.entropy_channel = self.num_classes + 1 if uncertainty else None
        self.error_channel = self.num_classes + 1 + int(uncertainty) if reconstruction else None
        self.maps_channel = self.num_classes + 1 + int(uncertainty) + int(reconstruction)
        self.maps = int(maps)
        self.channels = self.maps_channel + self.maps
        # By (first row, first column): the tiles along the scene's top and left edges weigh
        # their edge pixels fully (TileGrid.weights).
        self.tile_weights = {
            (r, c): blend_weights(tiles.tile, tiles.overlap, tiles.margin, first_row=r, first_col=c)
            for r in (True, False)
            for c in (True, False)
        }
        self.class_lut = np.asarray(info.class_ids, dtype=np.uint8)
        self.tiles_run = 0
        self.tiles_skipped = 0
        self.blocks_done = 0
        self.buffer_bytes = 0
        self.peak_buffer_bytes = 0
        self._current = -1  # index of the block being accumulated
        self._acc: np.ndarray | None = None
        self._right: np.ndarray | None = None
        self._bottom: dict[int, np.ndarray] = {}

    def memory_bound(self) -> int:
        """Upper bound of the accumulator bytes alive at once (see the module docstring)."""
        side, cols = self.blocks.side, self.blocks.block_cols
        return self.channels * 4 * (self.extent * self.extent + self.extent * self.overlap + self.overlap * side * cols)

    def summary(self) -> dict[str, Any]:
        """Counts for the run report's ``tiles`` entry."""
        return {
            "tiles_total": self.blocks.tiles_total,
            "tiles_run": self.tiles_run,
            "tiles_skipped": self.tiles_skipped,
            "blocks_written": self.blocks_done,
            "block_size": self.blocks.side,
            "peak_buffer_bytes": int(self.peak_buffer_bytes),
        }

    # -- feeding --------------------------------------------------------------------------
    def add(
        self,
        tile: Tile,
        valid: np.ndarray,
        probs: np.ndarray,
        expected_entropy: np.ndarray | None = None,
        reconstruction_error: np.ndarray | None = None,
        object_maps: np.ndarray | None = None,
    ) -> list[Block]:
        """Blend one tile's model outputs in.

        Args:
            tile: the tile (from :meth:`BlockGrid.order`).
            valid: (T, T) bool, the tile's valid-data mask (invalid pixels get weight 0).
            probs: (K, T, T) float32 class probabilities.
            expected_entropy: (T, T) mean per-sample entropy, when ``uncertainty``.
            reconstruction_error: (T, T), when ``reconstruction``.
            object_maps: (maps, T, T), when ``maps``.

        Returns:
            The blocks this tile's arrival completed, in write order.

        Raises:
            ValueError: a tile out of order, or an output the blender needs is missing.
        """
        done = self._advance_to(self.blocks.index_of(tile))
        acc = self._acc
        assert acc is not None
        blk = self.blocks.blocks[self._current]
        side = self.blocks.side
        r, c = tile.row - blk.row * side, tile.col - blk.col * side
        size = tile.size
        weight = self.tile_weights[tile.i == 0, tile.j == 0] * valid
        view = acc[:, r : r + size, c : c + size]
        view[: self.num_classes] += probs * weight
        view[self.weight_channel] += weight
        if self.entropy_channel is not None:
            if expected_entropy is None:
                raise ValueError("uncertainty output needs expected_entropy for every tile")
            view[self.entropy_channel] += expected_entropy * weight
        if self.error_channel is not None:
            if reconstruction_error is None:
                raise ValueError("reconstruction output needs reconstruction_error for every tile")
            view[self.error_channel] += reconstruction_error * weight
        if self.maps:
            if object_maps is None:
                raise ValueError("object maps output needs object_maps for every tile")
            view[self.maps_channel : self.maps_channel + self.maps] += object_maps * weight
        self.tiles_run += 1
        return done

    def skip(self, tile: Tile) -> list[Block]:
        """Record a tile that is entirely nodata (it adds nothing); the blocks it completed."""
        done = self._advance_to(self.blocks.index_of(tile))
        self.tiles_skipped += 1
        return done

    def finish(self) -> list[Block]:
        """The blocks still open once every tile is in."""
        return self._advance_to(len(self.blocks.blocks))

    def release(self) -> None:
        """Drop the buffers (after an error)."""
        self._acc = self._right = None
        self._bottom.clear()

    # -- accumulating ---------------------------------------------------------------------
    def _track(self) -> None:
        n = 0
        if self._acc is not None:
            n += self._acc.nbytes
        if self._right is not None:
            n += self._right.nbytes
        n += sum(s.nbytes for s in self._bottom.values())
        self.buffer_bytes = n
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, n)

    def _advance_to(self, index: int) -> list[Block]:
        """Finish every block before ``index`` and start block ``index``."""
        if index < self._current:
            raise ValueError("tiles must be fed in BlockGrid.order()")
        done = []
        while self._current < index:
            if self._current >= 0:
                block = self._finish_block(self._current)
                if block is not None:
                    done.append(block)
            self._current += 1
            if self._current < len(self.blocks.blocks):
                self._start_block(self._current)
        return done

    def _start_block(self, index: int) -> None:
        blk = self.blocks.blocks[index]
        acc = np.zeros((self.channels, self.extent, self.extent), dtype=np.float32)
        overlap, side = self.overlap, self.blocks.side
        if overlap:
            if blk.col > 0 and self._right is not None:
                acc[:, :, :overlap] += self._right
            self._right = None
            below = self._bottom.pop(blk.col, None)
            if below is not None:
                acc[:, :overlap, :side] += below
        self._acc = acc
        self._track()

    def _finish_block(self, index: int) -> Block | None:
        grid = self.blocks
        blk = grid.blocks[index]
        acc = self._acc
        assert acc is not None
        side = grid.side
        if self.overlap:
            if blk.col + 1 < grid.block_cols:
                self._right = acc[:, :, side:].copy()
            if index + grid.block_cols < len(grid.blocks):
                self._bottom[blk.col] = acc[:, side:, :side].copy()
            self._track()
        block = None
        if grid.written(blk):
            win = grid.window(blk)
            block = Block(win, self._values(acc[:, : int(win.height), : int(win.width)]))
            self.blocks_done += 1
        self._acc = None
        self._track()
        return block

    def _values(self, acc: np.ndarray) -> dict[str, np.ndarray]:
        """The output values of one complete block from its accumulator."""
        import torch

        wsum = acc[self.weight_channel]
        bad = wsum <= 0
        safe = np.where(bad, np.float32(1.0), wsum)
        probs = acc[: self.num_classes] / safe
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
        if self.entropy_channel is not None:
            # In place: a fresh (K, B, B) buffer per step costs more in page faults than the logs.
            plogp = tp.clamp_min(1e-12).log_().mul_(tp)
            entropy = plogp.sum(0).neg_().numpy()
            mutual = np.clip(entropy - acc[self.entropy_channel] / safe, 0.0, None)
            entropy[bad] = np.nan
            mutual[bad] = np.nan
            out["uncertainty"] = np.stack([entropy, mutual])
        if self.error_channel is not None:
            error = acc[self.error_channel] / safe
            error[bad] = np.nan
            out["reconstruction_error"] = error[None]
        if self.probabilities:
            chosen = probs[self.probabilities]
            if self.maps:
                chosen = np.concatenate([chosen, acc[self.maps_channel : self.maps_channel + self.maps] / safe])
            chosen[:, bad] = np.nan
            out["object_probability"] = chosen
        return out
