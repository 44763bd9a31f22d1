"""The one area convention of geovae's outputs, shared by polygons and the run report.

* **Projected CRS**: planar area in the CRS times the CRS unit's metres squared. It is the
  area a GIS shows for the polygons in that CRS; in UTM it is within about 0.1 % of the
  ground (geodesic) area, in an equal-area CRS it is the ground area, but in Web Mercator
  it overstates the ground area by 1 / cos^2(latitude).
* **Geographic CRS** (degrees, e.g. EPSG:4326): the geodesic area on the CRS's ellipsoid
  (:class:`pyproj.Geod`), since square degrees are no area at all.
* **No CRS** (pixel coordinates): square pixels.

:mod:`geovae.vector` measures each polygon with :meth:`AreaMeasure.areas`;
:class:`PixelAreas` measures cells of pixels with the same method, so the
report's class areas and the polygons' ``area_m2`` agree whatever the CRS.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.windows import Window

__all__ = ["AreaMeasure", "PixelAreas"]


class AreaMeasure:
    """Areas of polygons in world coordinates, by :mod:`geovae.areas`' convention.

    Args:
        crs: the coordinates' CRS (a rasterio CRS, a pyproj CRS or anything pyproj reads),
            or None for pixel coordinates.

    Attributes:
        kind: ``"planar"``, ``"geodesic"`` or ``"pixel"``.
        unit_m: metres per CRS unit (1 for geographic CRSs and pixel coordinates).
        geod: the ellipsoid's :class:`pyproj.Geod` for a geographic CRS, else None.
        crs: the pyproj CRS, or None.
    """

    def __init__(self, crs: Any):
        self.crs = None
        self.geod = None
        self.unit_m = 1.0
        self.kind = "pixel"
        if crs is None:
            return
        import pyproj

        self.crs = pyproj.CRS.from_wkt(crs.to_wkt()) if hasattr(crs, "to_wkt") else pyproj.CRS.from_user_input(crs)
        if self.crs.is_geographic:
            self.kind = "geodesic"
            self.geod = self.crs.get_geod()
        else:
            self.kind = "planar"
            self.unit_m = float(self.crs.axis_info[0].unit_conversion_factor) if self.crs.axis_info else 1.0

    @property
    def unit(self) -> str:
        """What the numbers mean, for reports (``area_unit``)."""
        return {
            "pixel": "pixel",
            "planar": "m2 (planar, in the projected CRS)",
            "geodesic": "m2 (geodesic, on the CRS's ellipsoid)",
        }[self.kind]

    def areas(self, geoms: np.ndarray) -> np.ndarray:
        """Areas of polygons in world coordinates.

        Args:
            geoms: shapely polygons or multipolygons in the CRS's coordinates.

        Returns:
            float64 areas in square metres (square pixels without a CRS).
        """
        geoms = np.asarray(geoms, dtype=object)
        if len(geoms) == 0:
            return np.zeros(0)
        if self.geod is None:
            return np.asarray(shapely.area(geoms), dtype=np.float64) * self.unit_m**2
        # Geod sums the signed area of every ring: exteriors must run CCW and holes CW, or a
        # hole would add its area instead of removing it.
        oriented = shapely.orient_polygons(geoms, exterior_cw=False)
        return np.array([abs(self.geod.geometry_area_perimeter(g)[0]) for g in oriented], dtype=np.float64)


class PixelAreas:
    """Area of pixels by class, by the convention of the polygons' ``area_m2``.

    :class:`AreaMeasure` decides it: planar area in a projected CRS, geodesic
    area on the ellipsoid in a geographic one, square pixels without a CRS. Geographic pixels
    shrink towards the poles, so each block is cut into cells of ``cell`` pixels, each cell
    is measured as one polygon with the same function that measures the polygons, and the
    pixels of a cell share its mean area.

    Attributes:
        measure: the :class:`AreaMeasure` (its ``unit`` names the convention).
    """

    def __init__(self, crs: Any, transform: Affine, cell: int = 64):
        self.transform = transform
        self.cell = cell
        self.measure = AreaMeasure(crs)

    def class_areas(self, classes: np.ndarray, window: Window, nvalues: int) -> np.ndarray:
        """Area per class value (0..nvalues-1) of a block of class indexes (-1 = nodata).

        Args:
            classes: (h, w) int array of class indexes, -1 where nodata.
            window: where the block lies in the scene.
            nvalues: number of classes.

        Returns:
            float64 (nvalues,) areas in m^2 (in pixels without a CRS).
        """
        h, w = classes.shape
        if self.measure.kind == "pixel":
            return np.bincount(classes[classes >= 0].ravel(), minlength=nvalues).astype(np.float64)
        c = self.cell
        nr, nc = math.ceil(h / c), math.ceil(w / c)
        cell_id = (np.arange(h)[:, None] // c) * nc + (np.arange(w)[None, :] // c)
        ok = classes >= 0
        counts = np.bincount(cell_id[ok] * nvalues + classes[ok], minlength=nr * nc * nvalues).reshape(nr * nc, nvalues)
        r0, c0 = int(window.row_off), int(window.col_off)
        rows = np.minimum(np.arange(nr + 1) * c, h) + r0
        cols = np.minimum(np.arange(nc + 1) * c, w) + c0
        cc, rr = np.meshgrid(cols, rows)
        xs, ys = self.transform @ (cc.astype(np.float64), rr.astype(np.float64))
        used = np.flatnonzero(counts.any(1))  # cells without a valid pixel need no measuring
        a, b = used // nc, used % nc
        ring = np.stack(
            [
                np.stack([xs[a, b], xs[a, b + 1], xs[a + 1, b + 1], xs[a + 1, b]], -1),
                np.stack([ys[a, b], ys[a, b + 1], ys[a + 1, b + 1], ys[a + 1, b]], -1),
            ],
            -1,
        )
        per_pixel = np.zeros(nr * nc)
        npx = (rows[a + 1] - rows[a]) * (cols[b + 1] - cols[b])
        per_pixel[used] = self.measure.areas(shapely.polygons(ring)) / npx
        return (counts * per_pixel[:, None]).sum(0)
