"""Open, validate and describe a raster scene; read windows of it with a valid-data mask.

* :mod:`~geovae.scene.raster`: any raster geovae reads: the name GDAL opens
  (:func:`gdal_path`), :func:`open_raster` (the one opener, one-line errors), the header
  checks, :func:`grid_mismatch`, :func:`capped_gdal_cache`;
* :mod:`~geovae.scene.scene`: :class:`Scene` (a validated header; windows read through one
  handle per thread with one valid-data mask rule) and :func:`open_scene` (a path, or a
  :class:`~geovae.sources.stack.StackedSource` through its VRT);
* :mod:`~geovae.scene.describe`: :func:`describe_scene`, what ``geovae info`` shows.
"""

from geovae.scene.describe import describe_scene
from geovae.scene.raster import capped_gdal_cache, gdal_path, grid_mismatch, is_remote, open_raster, scene_stem
from geovae.scene.scene import SUPPORTED_DTYPES, Scene, open_scene

__all__ = [
    "SUPPORTED_DTYPES",
    "Scene",
    "capped_gdal_cache",
    "describe_scene",
    "gdal_path",
    "grid_mismatch",
    "is_remote",
    "open_raster",
    "open_scene",
    "scene_stem",
]
