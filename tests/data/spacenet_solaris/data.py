#!/usr/bin/env python3
"""The SpaceNet fixture (solaris' test data).

* ``atlanta_sn4_building_mask_georef.tif`` and ``original/geotiff_labels.geojson``: the whole
  900 x 900 Atlanta tile's building mask (0/1, 0.5 m, EPSG:32616; 8 KB compressed) and its 43
  building footprints, geometry and the ``building``/``osm_id``/``origarea`` attributes only
  (the other 70 attributes are empty strings).
* ``original/sample_geotiff_custom_proj.tif``: a 64 x 64 window of the Albers int16 3-band
  Landsat-like image (nodata -9999).
* ``original/road_mask_input.tif``: a 64 x 64 window of the Las Vegas panchromatic image in
  EPSG:4326 (uint16, about 0.3 m pixels).

Source and licence: README.md beside this file.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import geopandas as gpd
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _fixture import crop_raster, shared_data  # noqa: E402

SET = "spacenet_solaris"


def main() -> None:
    (HERE / "original").mkdir(exist_ok=True)
    shutil.copyfile(
        shared_data(SET, "atlanta_sn4_building_mask_georef.tif"), HERE / "atlanta_sn4_building_mask_georef.tif"
    )
    fp = gpd.read_file(shared_data(SET, "original", "geotiff_labels.geojson"))
    out = HERE / "original" / "geotiff_labels.geojson"
    out.unlink(missing_ok=True)
    fp[["building", "osm_id", "origarea", "geometry"]].to_file(out, driver="GeoJSON", engine="pyogrio")
    crop_raster(
        shared_data(SET, "original", "sample_geotiff_custom_proj.tif"),
        HERE / "original" / "sample_geotiff_custom_proj.tif",
        Window(192, 192, 64, 64),
    )
    crop_raster(
        shared_data(SET, "original", "road_mask_input.tif"),
        HERE / "original" / "road_mask_input.tif",
        Window(600, 600, 64, 64),
    )


if __name__ == "__main__":
    main()
