"""Helpers for the fixture scripts (``tests/data/<set>/data.py``): where the real data is, and
a windowed copy of a real raster that keeps its grid, dtype, nodata, band names and colours.

Run a script from anywhere: ``python tests/data/<set>/data.py``. It reads the project's real-data
folder (``$GEOVAE_TEST_DATA``, else ``../shared/data`` next to the repository) and rewrites the
files beside it; they are committed with it. Outputs are deterministic: running a script again on
the same data gives the same files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[2]

#: Compressed; a tiled source stays tiled, in blocks smaller than the fixture so that reads cross
#: block edges; a striped source stays striped.
TIFF = dict(driver="GTiff", compress="deflate", zlevel=9)
TILES = dict(tiled=True, blockxsize=64, blockysize=64)


def shared_data(*parts: str) -> Path:
    """A file of the real-data folder; exits with one line when it is absent."""
    base = Path(os.environ.get("GEOVAE_TEST_DATA", ROOT.parent / "shared" / "data"))
    p = base.joinpath(*parts)
    if not p.exists():
        sys.exit(f"data.py: {p} not found (set GEOVAE_TEST_DATA to the shared real-data folder)")
    return p


def crop_raster(src_path: Path, dst_path: Path, window: Window, **overrides: object) -> np.ndarray:
    """Write ``window`` of ``src_path`` to ``dst_path`` on the same grid; returns the pixels.

    The profile, band descriptions, dataset tags, colour interpretation and colour tables are
    kept; the layout is :data:`TIFF` (plus :data:`TILES` for a tiled source, and a horizontal
    predictor for integer data) unless ``overrides`` say otherwise.
    """
    with rasterio.open(src_path) as src:
        data = src.read(window=window)
        profile = src.profile
        tiled = profile.pop("tiled", False)
        for k in ("blockxsize", "blockysize", "compress", "predictor", "photometric"):
            profile.pop(k, None)
        profile.update(TIFF, **(TILES if tiled else {}))
        if np.issubdtype(data.dtype, np.integer):
            profile["predictor"] = 2
        profile.update(
            width=int(window.width), height=int(window.height), transform=src.window_transform(window), **overrides
        )
        colormaps = {}
        for b in range(1, src.count + 1):
            try:
                colormaps[b] = src.colormap(b)
            except ValueError:
                pass
        descriptions, tags = src.descriptions, src.tags()
        colorinterp = src.colorinterp
        if src.count > 3 and ColorInterp.alpha not in colorinterp:
            # Else GDAL writes a fourth band after red, green, blue as alpha (a mask, not data).
            profile["alpha"] = "UNSPECIFIED"
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = descriptions
        dst.update_tags(**tags)
        dst.colorinterp = colorinterp
        for b, cmap in colormaps.items():
            dst.write_colormap(b, cmap)
    return data
