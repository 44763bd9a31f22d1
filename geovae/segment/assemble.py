"""The row bands of a split scene as a block source.

A huge scene can be segmented in row bands on several machines (:func:`geovae.segment.segment_rows`,
:mod:`geovae.batch`): each band's rasters cover whole rows of output blocks and equal the same
rows of a single run bit for bit. :class:`RowBands` reads them back block by block, in the
single run's write order, so the run skeleton feeds the same sinks the same blocks and the
assembled outputs (rasters, class areas, polygons) are those of one run.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import rasterio
from rasterio.windows import Window

from geovae.blend import BlockGrid
from geovae.blocks import Block

__all__ = ["RowBands", "split_entry"]


class RowBands:
    """The blocks of a scene's row bands, read from their rasters in write order.

    Args:
        blocks: the whole scene's block grid.
        bands: ``(start, stop)`` rows of each band, top to bottom.
        parts: what :func:`~geovae.segment.segment_rows` returned for each band
            (``{"rasters": {kind: path}, "tiles": tile counts}``).
    """

    def __init__(self, blocks: BlockGrid, bands: Sequence[tuple[int, int]], parts: Sequence[dict[str, Any]]):
        self.blocks = blocks
        self.bands = list(bands)
        self.parts = list(parts)
        self.blocks_read = 0

    def __iter__(self) -> Generator[Block]:
        sources: dict[str, Any] = {}
        band = -1
        try:
            for win in self.blocks.windows():
                r0 = int(win.row_off)
                if band < 0 or r0 >= self.bands[band][1]:
                    for ds in sources.values():
                        ds.close()
                    sources = {}
                    band += 1
                    sources = {k: rasterio.open(p) for k, p in self.parts[band]["rasters"].items()}
                part_win = Window(win.col_off, r0 - self.bands[band][0], win.width, win.height)
                arrays = {k: ds.read(window=part_win) for k, ds in sources.items()}
                self.blocks_read += 1
                yield Block(win, arrays)
        finally:
            for ds in sources.values():
                ds.close()

    def summary(self) -> dict[str, Any]:
        """The run report's ``tiles`` entry: the bands' tile counts added up."""
        tiles = {k: sum(p["tiles"][k] for p in self.parts) for k in ("tiles_total", "tiles_run", "tiles_skipped")}
        return {**tiles, "blocks_written": self.blocks_read, "block_size": self.blocks.side}


def split_entry(bands: Sequence[tuple[int, int]], parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run report's ``split`` entry: each band's rows and tile counts."""
    return {"bands": [{"rows": [a, b], "tiles": p["tiles"]} for (a, b), p in zip(bands, parts, strict=True)]}
