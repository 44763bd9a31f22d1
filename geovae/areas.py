"""The one area convention of geovae's outputs, shared by polygons and the run report.

* **Projected CRS**: planar area in the CRS times the CRS unit's metres squared. It is the
  area a GIS shows for the polygons in that CRS; in UTM it is within about 0.1 % of the
  ground (geodesic) area, in an equal-area CRS it is the ground area, but in Web Mercator
  it overstates the ground area by 1 / cos^2(latitude).
* **Geographic CRS** (degrees, e.g. EPSG:4326): the geodesic area on the CRS's ellipsoid
  (:class:`pyproj.Geod`), since square degrees are no area at all.
* **No CRS** (pixel coordinates): square pixels.

:mod:`geovae.vector` measures each polygon with :meth:`AreaMeasure.areas`;
:class:`geovae.stitch.PixelAreas` measures cells of pixels with the same method, so the
report's class areas and the polygons' ``area_m2`` agree whatever the CRS.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import shapely

__all__ = ["AreaMeasure"]


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
