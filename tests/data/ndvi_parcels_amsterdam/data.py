#!/usr/bin/env python3
"""The Amsterdam parcel fixture: real parcels of the Dutch crop-parcel register on a synthetic
NDVI raster laid on the real scene's grid.

* ``parcels_brp2020.fgb``: the 82 register parcels that lie wholly inside the 1,280 m square
  (635880, 5812000) - (637160, 5813280), EPSG:32631, with their attributes (category, gewas,
  gewascode). Several share an exact edge; many lie 1-2 pixels apart across a ditch.
* ``ndvi_from_parcels.tif``: 256 x 256 float32, 10 m, EPSG:32631 on the real NDVI grid, 640 m
  wider than that square on every side (so the parcels cover part of it only). Synthetic: NDVI
  0.77 inside a parcel and 0.29 outside (the real scene's means, see its README). The tests that
  use it check label and object mechanics on the grid; the real NDVI is for the slow tests.

Source and licence: README.md beside this file.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
import shapely
from rasterio.transform import from_origin

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _fixture import TIFF, TILES, shared_data  # noqa: E402

SET = "ndvi_parcels_amsterdam"
PARCELS_BOX = (635880.0, 5812000.0, 637160.0, 5813280.0)
MARGIN = 640.0
RES = 10.0


def main() -> None:
    parcels = gpd.read_file(shared_data(SET, "parcels_brp2020.gpkg"))
    keep = parcels[parcels.within(shapely.box(*PARCELS_BOX))].reset_index(drop=True)
    out = HERE / "parcels_brp2020.fgb"
    out.unlink(missing_ok=True)
    keep.to_file(out, driver="FlatGeobuf", engine="pyogrio", layer="parcels")
    with rasterio.open(shared_data(SET, "NDVI.tif")) as src:
        crs = src.crs
        assert src.res == (RES, RES) and (PARCELS_BOX[0] - MARGIN - src.bounds.left) % RES == 0
    left, top = PARCELS_BOX[0] - MARGIN, PARCELS_BOX[3] + MARGIN
    size = int((PARCELS_BOX[2] - PARCELS_BOX[0] + 2 * MARGIN) / RES)
    transform = from_origin(left, top, RES, RES)
    inside = rasterio.features.rasterize(keep.geometry, out_shape=(size, size), transform=transform, dtype="uint8")
    ndvi = np.where(inside > 0, 0.77, 0.29).astype(np.float32)
    profile = dict(
        TIFF, **TILES, width=size, height=size, count=1, dtype="float32", crs=crs, transform=transform, predictor=3
    )
    with rasterio.open(HERE / "ndvi_from_parcels.tif", "w", **profile) as dst:
        dst.write(ndvi, 1)
    shutil.copyfile(shared_data(SET, "LICENSE_apache2_source_repo.txt"), HERE / "LICENSE_apache2_source_repo.txt")
    print(f"{SET}: {len(keep)} parcels")


if __name__ == "__main__":
    main()
