"""A run's block stream wired by hand, for tests of blending and raster writing.

What ``segment_scene`` does around its source and sinks, without a model or a scene: an
OutputSet the test names, a Blender fed tile outputs, its blocks into the raster and
statistics sinks, the set committed at close (or everything aborted on an error).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from geovae.atomic import OutputSet
from geovae.blend import Blender, BlockGrid
from geovae.blocks import Block
from geovae.model.base import ModelInfo
from geovae.sinks.rasters import RasterFiles, RasterSink, RasterSpec
from geovae.sinks.statistics import Statistics, StatisticsSink
from geovae.tiling import TileGrid


class BlockRun:
    """A Blender and the raster and statistics sinks in an OutputSet of ``folder``."""

    def __init__(
        self,
        grid: TileGrid,
        folder: Path,
        stem: str,
        info: ModelInfo,
        crs: Any,
        transform: Any,
        *,
        uncertainty: bool = False,
        block_size: int = 1024,
        rows: tuple[int, int] | None = None,
    ):
        self.K = info.num_classes
        self.uncertainty = uncertainty
        self.blocks = BlockGrid(grid, block_size, rows)
        self.blender = Blender(self.blocks, info, uncertainty=uncertainty)
        self.output_set = OutputSet(folder, stem, lock=False)
        self.output_set.open()
        self.statistics = StatisticsSink(info, crs, transform)
        spec = RasterSpec.of_run(
            stem, info, width=grid.width, rows=self.blocks.rows, crs=crs, transform=transform, uncertainty=uncertainty
        )
        self.names = [spec.name(k) for k in spec.kinds] + [spec.name("classes") + ".aux.xml"]
        self.rasters = RasterSink(self.output_set, spec, list(self.blocks.windows()), self.statistics.pixels)
        self.files: RasterFiles | None = None
        self.counts: Statistics | None = None

    def order(self) -> Any:
        return self.blocks.order()

    def put(self, block: Block) -> None:
        self.rasters.add(block)
        self.statistics.add(block)

    def add(self, tile: Any, *args: Any, **kwargs: Any) -> None:
        for block in self.blender.add(tile, *args, **kwargs):
            self.put(block)

    def skip(self, tile: Any) -> None:
        for block in self.blender.skip(tile):
            self.put(block)

    def close(self, *, blend: bool = True) -> dict[str, Path]:
        """Finish the blocks (``blend``: the blender's last ones), close the sinks, commit; the
        final paths by kind."""
        try:
            if blend:
                for block in self.blender.finish():
                    self.put(block)
            self.files = self.rasters.close()
            self.counts = self.statistics.close()
            self.output_set.commit(self.names)
        except BaseException:
            self.rasters.abort()
            raise
        finally:
            self.output_set.close()
        return self.files.paths

    def abort(self) -> None:
        self.rasters.abort()
        self.output_set.close()
