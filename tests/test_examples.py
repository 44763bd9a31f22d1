"""Every script in examples/ runs, with fast settings (GEOVAE_EXAMPLE_FAST=1: 1 epoch, tiny
models, small tiles) on the committed window of the real NC data (``--data`` is tests/data,
laid out like the real-data folder), and does what its docstring says."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import FIXTURES

    monkeypatch.setenv("GEOVAE_EXAMPLE_FAST", "1")
    monkeypatch.setenv("GEOVAE_DATA", str(FIXTURES))
    monkeypatch.syspath_prepend(str(EXAMPLES))


def run(name: str, *argv: str) -> dict[str, Any]:
    import sys

    sys.modules.pop("_common", None)  # read GEOVAE_EXAMPLE_FAST afresh
    ns = runpy.run_path(str(EXAMPLES / name), run_name="example")
    return ns["main"](list(argv))


def test_every_example_is_tested() -> None:
    tested = {
        "segment_geotiff.py",
        "export_geojson.py",
        "train_own_labels.py",
        "batch_dask.py",
        "torchgeo_checkpoint.py",
    }
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == tested


def test_segment_geotiff_and_open_results(tmp_path: Path) -> None:
    import rasterio
    from conftest import FIXTURES

    got = run("segment_geotiff.py", "--out", str(tmp_path))
    res, scene = got["result"], Path(got["scene"])
    assert scene.is_relative_to(FIXTURES)  # the test data, not a download
    assert {"classes", "confidence", "uncertainty", "geojson", "gpkg", "stac", "report"} <= set(res.outputs)
    with rasterio.open(scene) as src:
        assert got["dataset"].rio.shape == src.shape and len(got["polygons"]) > 0
    assert got["item"].id == scene.stem


def test_export_geojson(tmp_path: Path) -> None:
    got = run("export_geojson.py", "--out", str(tmp_path / "landcover.geojson"))
    assert got["result"].n_polygons == len(got["polygons"]) > 0
    assert got["polygons"].crs.to_epsg() == 4326
    assert set(got["polygons"]["class_name"]) <= {
        "developed",
        "agriculture",
        "herbaceous",
        "shrubland",
        "forest",
        "water",
        "sediment",
    }
    assert (tmp_path / "landcover.gpkg").is_file()


def test_train_own_labels(tmp_path: Path) -> None:
    got = run("train_own_labels.py", "--out", str(tmp_path))
    assert Path(got["trained"].model_path).is_file()
    assert [c["name"] for c in got["result"].report["classes"]][:2] == ["developed", "agriculture"]


def test_batch_on_dask(tmp_path: Path) -> None:
    got = run("batch_dask.py", "--out", str(tmp_path), "--workers", "1")
    res = got["result"]
    assert (res.done, res.failed) == (2, 0), res.rows
    assert len([ln for ln in got["collection"].links if ln.rel == "item"]) == 2


def test_torchgeo_checkpoint(tmp_path: Path) -> None:
    got = run("torchgeo_checkpoint.py", "--out", str(tmp_path))
    assert got["checkpoint"].is_file() and Path(got["model"]).is_file()
    assert got["result"].report["model"]["kind"] != "vae"
