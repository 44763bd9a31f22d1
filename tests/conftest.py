"""Shared fixtures: the committed test data, the real data, and small helpers.

Two kinds of data, so that a bare clone passes its tests with nothing fetched:

* ``tests/data/<set>/``: small fixtures committed together with the script that made them
  (``data.py`` beside them: windows of the real rasters and polygons, or synthetic rasters on a
  real grid; ``tests/data/README.md`` lists them, each folder's README.md gives source and
  licence). Every fast test reads these, always, so it sees the same pixels on every machine.
* the real-data folder, ``../shared/data`` next to the repository or the folder named by
  ``GEOVAE_TEST_DATA``: whole scenes for the slow real-data tests (``@pytest.mark.slow``) and the
  benchmarks. Where it is absent those tests skip with one line naming the missing file.

The demo's registry package (``geovae demo`` fetches it) is not used by the tests: nothing is
downloaded inside a test, and the committed NC window is enough for every fast test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data"
DATA = Path(os.environ.get("GEOVAE_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``geovae ARGS`` in this process: its exit code, stdout and stderr."""
    from geovae.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The one line of a user error on stderr (``geovae: error: ...``), asserted to be alone."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("geovae: error: "), err
    return lines[0]


def fixture_path(*parts: str) -> Path:
    """Path of a committed test fixture under ``tests/data``.

    Raises:
        FileNotFoundError: if it is missing (it is part of the repository).
    """
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"test fixture {p} is missing; it is committed: restore it with git")
    return p


def data_path(*parts: str) -> Path:
    """Path of a file in the real-data folder; skips the test when it is absent."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not found: {p} (set GEOVAE_TEST_DATA to the shared data folder)")
    return p


def config_on_fixtures(name: str, folder: Path) -> Path:
    """A copy of ``configs/<name>`` in ``folder`` whose data paths name the committed fixtures.

    The shipped configs name the real-data folder (``../shared/data/<set>/<file>``); the fixture
    tree mirrors its layout, so each such path becomes ``tests/data/<set>/<file>``. Every other
    setting is the shipped one.
    """
    import yaml

    prefix = "../shared/data/"

    def swap(value: object) -> object:
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, str) and value.startswith(prefix):
            return str(fixture_path(*value[len(prefix) :].split("/")))
        return value

    cfg = swap(yaml.safe_load((ROOT / "configs" / name).read_text()))
    assert prefix not in str(cfg), f"configs/{name} names the real-data folder in a way this copy misses"
    out = folder / name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


NC = "nc_landsat7_landclass96"
#: The committed NC window: columns 136-391, rows 296-439 of the 489 x 443 scene (tests/data/nc_landsat7_landclass96).
NC_WIDTH, NC_HEIGHT = 256, 144


@contextmanager
def batchnorm_statistics(net: Any) -> Iterator[None]:
    """An untrained net's BatchNorm statistics from the forward passes inside the block (their
    cumulative mean, without gradients); the net is in eval mode after it."""
    import torch

    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        yield
    net.eval()


def register_classes(parcels: Any, profile: dict[str, Any], background_id: int) -> Any:
    """The parcels as object training rasterises them on the grid of ``profile``: parcel 1, a
    1-pixel boundary 2 along every outline (on both sides of a shared edge), background
    ``background_id`` elsewhere; uint8."""
    import numpy as np
    import rasterio.features

    from geovae.training.labels import object_mask

    ids = rasterio.features.rasterize(
        [(g, k + 1) for k, g in enumerate(parcels.geometry)],
        out_shape=(profile["height"], profile["width"]),
        transform=profile["transform"],
        dtype="int32",
    ).astype(np.int64)
    background = np.ones(ids.shape, bool)
    return object_mask(ids, np.array([0] + [1] * len(parcels)), 1, 2, background, background_id).astype(np.uint8)


@pytest.fixture
def nc_stack() -> Path:
    """NC Landsat-7 2000, 6 bands uint8, nodata 0, EPSG:3358: the committed 256 x 144 window."""
    return fixture_path(NC, "nc_lsat7_2000_6band_uint8.tif")


@pytest.fixture
def nc_labels() -> Path:
    """NC 1996 land-class map on the same grid, 0 = nodata, classes 1..7 (all seven present)."""
    return fixture_path(NC, "nc_landclass96_label_uint8.tif")


@pytest.fixture
def nc_polygons() -> Path:
    """The hand-drawn training polygons rasterised on the same grid (0 elsewhere; six classes)."""
    return fixture_path(NC, "nc_training_polygons_label_uint8.tif")


@pytest.fixture
def nc_polygons_shp() -> Path:
    """The training polygons that reach the window, as drawn (fields ``label`` and ``id``)."""
    return fixture_path(NC, "original", "landsat96_polygons.shp")


@pytest.fixture(scope="session")
def nc_rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bands 3, 2, 1 (red, green, blue) of the NC window as a 3-band uint8 GeoTIFF, nodata 0."""
    import rasterio

    src_path = fixture_path(NC, "nc_lsat7_2000_6band_uint8.tif")
    out = tmp_path_factory.mktemp("nc_rgb") / "nc_rgb.tif"
    with rasterio.open(src_path) as src:
        profile = src.profile | {"count": 3}
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(src.read([3, 2, 1]))
    return out


@pytest.fixture(scope="session")
def nc_demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``geovae demo --data`` folder for the committed NC window, in the formats of the demo's
    registry package: each band float32 with nodata -99999 (B7 int16 with -32768) in EPSG:32119,
    the land-class map float32 ``strata.tif`` in EPSG:3358. The package's bands are whole DN
    1..255, so these hold the same numbers as its files do on this window."""
    import numpy as np
    import rasterio

    from geovae.demo import BANDS, LABELS

    out = tmp_path_factory.mktemp("nc_demo_data")
    with rasterio.open(fixture_path(NC, "nc_lsat7_2000_6band_uint8.tif")) as src:
        stack, profile = src.read(), src.profile
    with rasterio.open(fixture_path(NC, "nc_landclass96_label_uint8.tif")) as src:
        labels = src.read(1)
    base = {k: profile[k] for k in ("driver", "width", "height", "transform")} | {"count": 1}
    for band, name in zip(stack, BANDS, strict=True):
        dtype, nodata = ("int16", -32768) if name.endswith("_70.tif") else ("float32", -99999.0)
        prof = base | {"dtype": dtype, "nodata": nodata, "crs": "EPSG:32119"}
        with rasterio.open(out / name, "w", **prof) as dst:
            dst.write(np.where(band == 0, nodata, band.astype(dtype)).astype(dtype), 1)
    prof = base | {"dtype": "float32", "nodata": -99999.0, "crs": profile["crs"]}
    with rasterio.open(out / LABELS, "w", **prof) as dst:
        dst.write(np.where(labels == 0, -99999.0, labels).astype("float32"), 1)
    return out


@pytest.fixture
def rgb_byte() -> Path:
    """A window of rasterio's RGB.byte.tif: 3 bands uint8, EPSG:32618, nodata 0 with a ragged edge."""
    return fixture_path("rasterio_testdata", "RGB.byte.tif")


@pytest.fixture
def rgba_byte() -> Path:
    """The same window of RGBA.byte.tif: 3 bands and an alpha band, 70 % valid."""
    return fixture_path("rasterio_testdata", "RGBA.byte.tif")


@pytest.fixture
def parana() -> Path:
    """A 160 x 128 window of the Landsat-8 Paraná scene: uint16, 3 bands, EPSG:32621, 30 % fill 0
    without a nodata tag."""
    return fixture_path("landsat8_parana", "LC08_L1TP_224078_20200518_20200518_01_RT.TIF")


@pytest.fixture
def gulfcoast() -> Path:
    """The real Landsat-8 Gulf Coast stack (clouds: only the whole scene has them as they are)."""
    return data_path("landsat8_gulfcoast", "l8_stack_B2-B7_30m.tif")


@pytest.fixture
def gulfcoast_bqa() -> Path:
    return data_path("landsat8_gulfcoast", "l8_BQA.tif")


@pytest.fixture
def atlanta_mask() -> Path:
    """The SpaceNet Atlanta tile's building mask (0/1, 900 x 900, 0.5 m, EPSG:32616)."""
    return fixture_path("spacenet_solaris", "atlanta_sn4_building_mask_georef.tif")


def pytest_configure(config: pytest.Config) -> None:
    # The suite's models are small: one intra-op thread per test process is as fast as two on
    # an idle 2-core machine and many times faster on a busy one, and `-n 2` then uses both cores.
    import torch

    torch.set_num_threads(1)
