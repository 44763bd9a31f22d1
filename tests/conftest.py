"""Shared fixtures: where the real data lives, and small helpers.

Real rasters are read from ``../shared/data`` next to the repository, or from the folder
named by ``GEOVAE_TEST_DATA``. Tests that need them skip with a clear reason where absent,
so a fresh clone still passes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEOVAE_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()


def data_path(*parts: str) -> Path:
    """Path of a file in the shared real-data folder; skips the test when it is absent."""
    p = DATA.joinpath(*parts)
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
