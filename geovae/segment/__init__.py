"""Segmenting a scene: options, reading, the model loop, products and the report.

``segment_scene`` is the one way a scene becomes outputs; the CLI, the Python API, the demo
and :mod:`geovae.batch` all call it (batch's split runs through ``segment_rows`` and
``assemble_rows``, the same machinery cut in row bands).
"""

from geovae.segment.options import SegmentOptions
from geovae.segment.run import SegmentResult, assemble_rows, segment_rows, segment_scene

__all__ = ["SegmentOptions", "SegmentResult", "assemble_rows", "segment_rows", "segment_scene"]
