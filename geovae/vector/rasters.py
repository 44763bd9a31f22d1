"""The rasters a layer is traced from: the class raster and the bands on its grid.

:class:`ClassRaster` opens and checks them once for :func:`~geovae.vector.write_polygons`
and :func:`~geovae.vector.write_objects`, gives the :class:`~geovae.vector.engine.LayerOptions`
of their grid, and runs the engine with GDAL's block cache capped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
from affine import EPSILON
from rasterio.windows import Window

from geovae.choices import Connectivity
from geovae.errors import OptionError, SceneError
from geovae.products import read_class_table
from geovae.scene import capped_gdal_cache, grid_mismatch, open_raster
from geovae.vector.engine import Layer, LayerOptions, VectorizeResult, trace_layer

__all__ = ["ClassRaster", "read_floats"]

#: GDAL block cache while vectorising (bytes): blocks are read once, so a small cache.
_GDAL_CACHE_BYTES = 16 * 2**20


class ClassRaster:
    """A class raster opened for tracing, with the rasters on its grid; a context manager
    that closes them all.

    Args:
        path: the class raster (integer class ids in band 1).
        targets: ``(final path, path to write)`` per output.

    Raises:
        SceneError: the class raster is missing or not a readable raster, or its band 1 is
            not integer.
        OptionError: GeoJSON asked for a raster without CRS.
    """

    def __init__(self, path: str | os.PathLike[str], targets: Sequence[tuple[Path, Path]]):
        self.src = open_raster(path, "class raster")
        self._open: list[rasterio.DatasetReader] = [self.src]
        self.targets = tuple((Path(f), Path(d)) for f, d in targets)
        try:
            src = self.src
            if not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
                raise SceneError(
                    f"class raster {src.name} has dtype {src.dtypes[0]}; class ids must be integers (e.g. uint8)"
                )
            if src.crs is None and any(f.suffix.lower() == ".geojson" for f, _ in self.targets):
                raise OptionError(f"GeoJSON needs a CRS and {src.name} has none; use .gpkg or .parquet")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ClassRaster:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for ds in reversed(self._open):
            ds.close()
        self._open = []

    def band(self, path: str | os.PathLike[str] | None, what: str) -> rasterio.DatasetReader | None:
        """Open the ``what`` raster at ``path`` (None: none), which must lie on the class raster's grid.

        Raises:
            SceneError: it is missing or not a readable raster.
            OptionError: it lies on another grid.
        """
        if path is None:
            return None
        ds = open_raster(path, f"{what} raster")
        self._open.append(ds)
        # affine's default tolerance (1e-5): rasters written together by any tool pass
        problems = grid_mismatch(self.src, ds, precision=EPSILON)
        if problems:
            raise OptionError(
                f"{what} raster {ds.name} is on another grid than the class raster {self.src.name} "
                f"({'; '.join(problems)}); pass the {what} raster written together with the classes"
            )
        return ds

    def class_table(self) -> dict[int, dict[str, Any]]:
        """The class raster's class table (:func:`~geovae.products.read_class_table`)."""
        return read_class_table(self.src)

    def trace(
        self,
        layer: Layer,
        *,
        block: int,
        min_area: float,
        simplify: float,
        connectivity: Connectivity,
        name: str,
        progress: Callable[[int, int], None] | None,
    ) -> VectorizeResult:
        """Run ``layer`` over the class raster's grid into the targets (:func:`trace_layer`)."""
        src = self.src
        options = LayerOptions(
            targets=self.targets,
            width=src.width,
            height=src.height,
            crs=src.crs,
            transform=src.transform,
            block=block,
            min_area=min_area,
            simplify=simplify,
            connectivity=connectivity,
            layer=name,
        )
        # Every block is read once, so GDAL's block cache (5 % of RAM by default) buys
        # nothing here and would keep every block read, growing memory with the raster.
        with capped_gdal_cache(_GDAL_CACHE_BYTES):
            return trace_layer(layer, options, progress=progress)


def read_floats(ds: rasterio.DatasetReader | None, win: Window) -> np.ndarray | None:
    """Band 1 of a float raster as float32 with NaN at nodata; None without the raster."""
    if ds is None:
        return None
    a = ds.read(1, window=win, masked=False).astype(np.float32)
    if ds.nodata is not None and not np.isnan(ds.nodata):
        a = np.where(a == ds.nodata, np.nan, a)
    return a
