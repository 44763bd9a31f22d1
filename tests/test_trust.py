"""A scene the model cannot read is refused or flagged, never silently mapped.

One short real training run on the NC Landsat-7 scene (its model file records the training
quantiles and reconstruction error, as every `geovae train` does) serves every case: the
training scene is not flagged, a Landsat-8 scene and the NC scene scaled to uint16 are refused
with one line, and with --force they run with a warning and nearly every pixel flagged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import run

pytestmark = pytest.mark.slow  # one real training run (about 20 s on one thread) for the module


@pytest.fixture(scope="module")
def nc_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import fixture_path

    from geovae.training import train_model

    torch.set_num_threads(1)
    nc = fixture_path("nc_landsat7_landclass96", "nc_lsat7_2000_6band_uint8.tif")
    labels = fixture_path("nc_landsat7_landclass96", "nc_landclass96_label_uint8.tif")
    out = tmp_path_factory.mktemp("trust") / "nc.safetensors"
    res = train_model(
        nc,
        labels,
        out,
        epochs=2,
        tile=64,
        batch_size=16,
        base_channels=8,
        depth=3,
        latent_channels=4,
        progress=False,
        seed=0,
    )
    assert set(res.info.training) == {"dtype", "quantiles", "reconstruction_error_quantiles"}
    return res.model_path


def test_the_training_scene_is_not_flagged(nc_model: Path, nc_stack: Path, tmp_path: Path) -> None:
    import geopandas as gpd

    from geovae.segment import segment_scene

    r = segment_scene(nc_stack, nc_model, tmp_path / "o", formats=("gpkg",), progress=False)
    trust = r.report["trust"]
    assert trust["scene"]["checked"] and not trust["scene"]["far_outside"]
    assert trust["anomaly"]["fraction"] < 0.02, trust["anomaly"]
    # the reconstruction-error raster is written by default for such a model, and used
    assert "reconstruction_error" in r.outputs
    assert all(0 <= c["anomaly_fraction"] <= 1 for c in r.report["classes"])
    gdf = gpd.read_file(r.outputs["gpkg"], layer="nc_lsat7_2000_6band_uint8")
    assert gdf["anomaly_fraction"].between(0, 1).all()
    # by area, the polygons' flagged share is the scene's (a one-pixel polygon is 0 or 1)
    by_area = (gdf["anomaly_fraction"] * gdf["area_m2"]).sum() / gdf["area_m2"].sum()
    assert by_area == pytest.approx(trust["anomaly"]["fraction"], abs=1e-6)


def test_another_sensor_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], nc_model: Path, gulfcoast: Path, tmp_path: Path
) -> None:
    """A real Landsat-8 scene (6 bands, uint16) into the Landsat-7 (uint8) model: refused, nothing written."""
    code, _, err = run(capsys, "segment", str(gulfcoast), "-m", str(nc_model), "-o", str(tmp_path / "o"))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "does not look like the model's training data" in err and "uint16" in err and "--force" in err
    assert not (tmp_path / "o").exists()


def test_another_scale_is_refused_and_forced_runs_flagged(
    capsys: pytest.CaptureFixture[str], nc_model: Path, nc_stack: Path, tmp_path: Path
) -> None:
    scaled = tmp_path / "nc_x257.tif"
    with rasterio.open(nc_stack) as src, rasterio.open(scaled, "w", **(src.profile | {"dtype": "uint16"})) as dst:
        dst.write(src.read().astype("uint16") * 257)
    code, _, err = run(capsys, "segment", str(scaled), "-m", str(nc_model), "-o", str(tmp_path / "o"))
    assert code == 1 and err.count("\n") == 1 and "scaled differently" in err
    code, _, err = run(capsys, "-q", "segment", str(scaled), "-m", str(nc_model), "-o", str(tmp_path / "o"), "--force")
    report = json.loads((tmp_path / "o" / "nc_x257.json").read_text())
    assert code == 0 and report["trust"]["scene"]["forced"]
    assert report["trust"]["anomaly"]["fraction"] > 0.9, report["trust"]["anomaly"]
    # -q keeps errors only; without it the run says once that the map is not to be trusted
    code, _, err = run(
        capsys, "segment", str(scaled), "-m", str(nc_model), "-o", str(tmp_path / "o2"), "--force", "--formats", "gpkg"
    )
    warned = [ln for ln in err.splitlines() if "unlike the model's training data" in ln]
    assert code == 0 and len(warned) == 1 and warned[0].startswith("geovae: warning: ")


def test_a_model_without_training_statistics_is_not_checked(nc_stack: Path, tmp_path: Path) -> None:
    """A TorchGeo checkpoint carries no normalisation: the range check has nothing to compare with."""
    from torch import nn

    from geovae.model.base import ModelInfo, SegmentationModel
    from geovae.segment import segment_scene

    net = nn.Conv2d(6, 3, 1)
    model = SegmentationModel(net, ModelInfo(in_channels=6, num_classes=3, tile_size=64), "cpu")
    r = segment_scene(nc_stack, model, tmp_path / "o", formats=(), quicklook=False, progress=False)
    assert r.report["trust"]["scene"] == {"checked": False, "reason": "the model file records no training statistics"}
    assert "anomaly" not in r.report["trust"]


def test_the_sample_is_sparse_on_a_large_scene(nc_stack: Path) -> None:
    """The check never reads a whole large scene: about 64 windows of 256², evenly spread."""
    from geovae.scene import open_scene

    s = open_scene(nc_stack)
    assert s.sample().shape[1] == int(s.read_overview(10_000)[1].sum())  # small scene: all of it
    big = s.sample(windows=4, size=64)
    assert 0 < big.shape[1] <= 4 * 64 * 64 and np.isfinite(big).all()
