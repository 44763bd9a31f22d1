"""Where scenes come from besides a raster path: rasters stacked band-wise, STAC Items.

* :mod:`~geovae.sources.stack`: rasters (or a STAC Item's band assets) stacked into one
  scene through a GDAL VRT, on the first raster's grid, clipped to an area;
* :mod:`~geovae.sources.stac`: a STAC API search (pystac-client) or an item file
  (stac-geoparquet, GeoJSON) -> Items -> stacked sources;
* :mod:`~geovae.sources.filters`: the search's area, dates and query, parsed once and
  applied to the Items of a file as an API applies them;
* :mod:`~geovae.sources.remote`: the size and ETag or modification time of a remote file,
  which a batch's resume fingerprint records.

:func:`geovae.scene.open_scene` opens a :class:`StackedSource` like any raster path.
"""

from geovae.sources.filters import parse_assets, parse_bbox, parse_query, read_area
from geovae.sources.stac import Search, find_items, is_item_file, item_source, item_sources, read_items, scene_inputs
from geovae.sources.stack import Raster, StackedSource, StackedVrt, build_vrt, stack_rasters

__all__ = [
    "Raster",
    "Search",
    "StackedSource",
    "StackedVrt",
    "build_vrt",
    "find_items",
    "is_item_file",
    "item_source",
    "item_sources",
    "parse_assets",
    "parse_bbox",
    "parse_query",
    "read_area",
    "read_items",
    "scene_inputs",
    "stack_rasters",
]
