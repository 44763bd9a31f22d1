#!/usr/bin/env python3
"""The rasterio test-raster fixture: windows of rasterio's RGB.byte.tif, RGBA.byte.tif and shade.tif.

``RGB.byte.tif`` / ``RGBA.byte.tif``: the same 160 x 128 window (columns 64-223, rows 128-255)
across the scene's ragged western edge, so that 70 % of it is valid: the nodata-0 frame and the
alpha band are both there. ``shade.tif``: a 128 x 128 window (columns 864-991, rows 320-447),
half of it nodata 255, in Web Mercator. Source and licence: README.md beside this file.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _fixture import crop_raster, shared_data  # noqa: E402

SET = "rasterio_testdata"
WINDOWS = {
    "RGB.byte.tif": Window(64, 128, 160, 128),
    "RGBA.byte.tif": Window(64, 128, 160, 128),
    "shade.tif": Window(864, 320, 128, 128),
}


def main() -> None:
    for name, window in WINDOWS.items():
        crop_raster(shared_data(SET, name), HERE / name, window)
    shutil.copyfile(shared_data(SET, "rasterio_LICENSE.txt"), HERE / "rasterio_LICENSE.txt")


if __name__ == "__main__":
    main()
