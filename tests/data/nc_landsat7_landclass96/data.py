#!/usr/bin/env python3
"""The NC Landsat-7 fixture: a 256 x 144 window of the real scene, its land-class map, the
training-polygon raster and the training polygons that reach into it.

The window (columns 136-391, rows 296-439 of the 489 x 443 scene) holds all seven land classes,
six of the seven polygon classes (no agriculture polygon reaches it), the scene's ragged nodata
edge in the south and the larger nodata gap of band 7, and is not square (a transposed axis
shows). 256 columns: a quarter of them, the default validation part, is one 64-pixel tile wide.
Source and licence: README.md beside this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import geopandas as gpd
import shapely
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _fixture import crop_raster, shared_data  # noqa: E402

SET = "nc_landsat7_landclass96"
WINDOW = Window(136, 296, 256, 144)
RASTERS = ("nc_lsat7_2000_6band_uint8.tif", "nc_landclass96_label_uint8.tif", "nc_training_polygons_label_uint8.tif")


def main() -> None:
    for name in RASTERS:
        crop_raster(shared_data(SET, name), HERE / name, WINDOW)
    import rasterio

    with rasterio.open(HERE / RASTERS[0]) as ds:
        box = shapely.box(*ds.bounds)
    polygons = gpd.read_file(shared_data(SET, "original", "landsat96_polygons.shp"))
    keep = polygons[polygons.intersects(box)].reset_index(drop=True)  # whole polygons, as drawn
    (HERE / "original").mkdir(exist_ok=True)
    keep.to_file(HERE / "original" / "landsat96_polygons.shp", engine="pyogrio")
    print(f"{SET}: {len(keep)} of {len(polygons)} training polygons reach the window")


if __name__ == "__main__":
    main()
