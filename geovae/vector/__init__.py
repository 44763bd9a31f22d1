"""Rasters -> polygons -> GeoJSON / GeoPackage / GeoParquet, block-wise in bounded memory.

One concept per module, data moving forward:

* :mod:`~geovae.vector.trace`: one block -> polygon pieces in exact pixel coordinates,
  with the sums and counts of the bands averaged per polygon.
* :mod:`~geovae.vector.join`: pieces of one region cut by block lines -> one polygon.
* :mod:`~geovae.vector.formats`: the GeoJSON, GeoPackage and GeoParquet writers, fed
  Arrow batches on their own threads; the atomic output files.
* :mod:`~geovae.vector.engine`: :func:`trace_layer`, the block-wise engine any polygon
  layer (:class:`Layer`) goes through, with its :class:`LayerOptions`.
* :mod:`~geovae.vector.rasters`: the class raster and the rasters on its grid a layer reads.
* :mod:`~geovae.vector.regions`: class regions (:func:`vectorize`, :func:`write_polygons`).
* :mod:`~geovae.vector.stream`: :class:`PolygonStream`, the class regions of a ``segment``
  run traced from each block as it is written (a :class:`~geovae.blocks.BlockSink`).
* :mod:`~geovae.vector.objects`: one polygon per object (:func:`vectorize_objects`,
  :func:`write_objects`).
"""

from geovae.vector.engine import Layer, LayerOptions, OpenState, VectorizeResult, check_options, trace_layer
from geovae.vector.objects import ObjectResult, vectorize_objects, write_objects
from geovae.vector.regions import scene_layer_name, vectorize, write_polygons
from geovae.vector.stream import PolygonStream

__all__ = [
    "Layer",
    "LayerOptions",
    "ObjectResult",
    "OpenState",
    "PolygonStream",
    "VectorizeResult",
    "check_options",
    "scene_layer_name",
    "trace_layer",
    "vectorize",
    "vectorize_objects",
    "write_objects",
    "write_polygons",
]
