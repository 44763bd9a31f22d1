"""The object sink: one polygon per object of ``--objects`` classes (:mod:`geovae.objects`).

Splitting touching objects needs each block's neighbourhood (the object halo) in every
direction, including the rows below it, which the block stream has not produced yet: so the
sink takes no pixels from the blocks and runs its pass when it is closed, block-wise over
the class, object-probability and confidence rasters the raster sink has staged in the run's
output set (close it after the raster sink).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from geovae.atomic import OutputSet
from geovae.blocks import Block
from geovae.products import object_kind, output_name

__all__ = ["ObjectSink"]


class ObjectSink:
    """The object polygons of a run, written into its output set when closed.

    Args:
        output_set: the run's open :class:`~geovae.atomic.OutputSet`.
        stem: output name stem (the rasters are read from the set under their names).
        spec: the :class:`~geovae.objects.ObjectSpec` (classes, boundary, seed, halo).
        formats: the polygon formats written, one object file each.
        min_area, simplify: as for the class polygons.
        block_size: block side of the object pass.
    """

    def __init__(
        self,
        output_set: OutputSet,
        stem: str,
        spec: Any,
        formats: Sequence[str],
        *,
        min_area: float,
        simplify: float,
        block_size: int,
    ):
        self.output_set = output_set
        self.stem = stem
        self.spec = spec
        self.formats = list(formats)
        self.min_area = min_area
        self.simplify = simplify
        self.block_size = block_size

    def add(self, block: Block) -> None:
        """Nothing to do per block: the pass runs over the staged rasters at :meth:`close`."""

    def close(self, progress: Callable[[int, int], None] | None = None) -> Any:
        """Write the object polygons in every format; the :class:`~geovae.objects.ObjectResult`.

        Args:
            progress: an optional ``progress(done_rows, total_rows)``, after each row of blocks.
        """
        from geovae.vector import write_objects

        oset, stem = self.output_set, self.stem
        targets = [
            (oset.final(output_name(stem, object_kind(f))), oset.path(output_name(stem, object_kind(f))))
            for f in self.formats
        ]
        return write_objects(
            oset.path(output_name(stem, "classes")),
            targets,
            self.spec,
            probabilities=oset.path(output_name(stem, "object_probability")),
            confidence=oset.path(output_name(stem, "confidence")),
            min_area=self.min_area,
            simplify=self.simplify,
            block_size=self.block_size,
            layer=f"{stem}_objects",
            progress=progress,
        )

    def abort(self) -> None:
        """Nothing to undo: what the pass wrote lies in the set's staging folder, which goes with it."""
