"""Blocks of a scene's outputs and the sinks that consume them.

A block source (the blender of tile outputs, or the assembler of a split scene's row bands)
yields :class:`Block` objects in write order: row by row, each row left to right. Every
sink (rasters, statistics, polygons, objects) is fed each block with :meth:`BlockSink.add`,
then closed, or aborted after an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from rasterio.windows import Window

__all__ = ["Block", "BlockSink"]


@dataclass(frozen=True)
class Block:
    """One output block.

    Attributes:
        window: the block's window in scene coordinates.
        arrays: kind -> ``(bands, h, w)``: ``"classes"`` (uint8, 255 nodata),
            ``"confidence"``, ``"uncertainty"``, ``"reconstruction_error"``,
            ``"object_probability"`` (float32, NaN nodata).
    """

    window: Window
    arrays: Mapping[str, np.ndarray]


class BlockSink(Protocol):
    """What consumes the blocks of a run, in write order."""

    def add(self, block: Block) -> None:
        """Take the next block."""

    def close(self) -> Any:
        """Finish (COG copies, the polygons' tail); return the sink's result."""

    def abort(self) -> None:
        """After an error: stop threads, delete partial files."""
