"""Segmenting a scene: options, reading, the model loop, products and the report.

``segment_scene`` is the one way a scene becomes outputs; the CLI, the Python API, the demo
and :mod:`geovae.batch` all call it (batch's split runs through ``segment_rows`` and
``assemble_rows``, the same machinery cut in row bands). The run itself is imported on
first use, so the command line reads :class:`SegmentOptions` without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from geovae.segment.options import SegmentOptions

if TYPE_CHECKING:
    from geovae.segment.run import SegmentResult, assemble_rows, segment_rows, segment_scene

__all__ = ["SegmentOptions", "SegmentResult", "assemble_rows", "segment_rows", "segment_scene"]

_RUN = {"SegmentResult", "assemble_rows", "segment_rows", "segment_scene"}


def __getattr__(name: str) -> Any:
    if name in _RUN:
        from geovae.segment import run

        return getattr(run, name)
    raise AttributeError(f"module 'geovae.segment' has no attribute {name!r}")
