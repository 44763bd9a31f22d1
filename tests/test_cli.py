"""The command line: exit codes, one-line errors, and `info` on real rasters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geovae.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected_code: int = 1, *fragments: str) -> None:
    assert code == expected_code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    assert lines[0].startswith("geovae: error: ")
    for f in fragments:
        assert f.lower() in lines[0].lower(), lines[0]


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "geovae, version" in out
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for sub in ("info", "segment", "vectorize", "train", "evaluate", "batch", "demo"):
        assert sub in out
        c, o, _ = run(capsys, sub, "--help")
        assert c == 0 and "Usage: geovae " + sub in o


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "No such command" in err
    code, _, err = run(capsys, "segment", "scene.tif")
    assert code == 2 and "--model" in err
    code, _, err = run(capsys, "segment", "scene.tif", "-m", "m", "-o", "o", "--formats", "kml")
    assert code == 2 and "geojson" in err


def test_info_nc_stack(capsys: pytest.CaptureFixture[str], nc_stack: Path) -> None:
    code, out, _ = run(capsys, "info", str(nc_stack), "--json")
    assert code == 0
    d = json.loads(out)
    assert d["epsg"] == 3358
    assert (d["width"], d["height"], d["count"]) == (256, 144, 6)
    assert d["res"][0] == pytest.approx(28.5)
    west, south, east, north = d["bounds_wgs84"]
    assert -80 < west < east < -78 and 35 < south < north < 36.5  # Raleigh, NC
    code, text, _ = run(capsys, "info", str(nc_stack))
    assert code == 0 and "3358" in text and "256" in text


def test_info_nodata_and_alpha(capsys: pytest.CaptureFixture[str], rgb_byte: Path, rgba_byte: Path) -> None:
    code, out, _ = run(capsys, "info", str(rgb_byte), "--json")
    d = json.loads(out)
    assert code == 0 and d["nodata"] == 0 and d["epsg"] == 32618 and d["count"] == 3
    code, out, _ = run(capsys, "info", str(rgba_byte), "--json")
    assert code == 0 and "alpha" in out.lower()


def test_info_bad_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path, nc_stack: Path) -> None:
    code, _, err = run(capsys, "info", str(tmp_path / "missing.tif"))
    assert_one_line_error(code, err, 1, "missing.tif")

    code, _, err = run(capsys, "info", str(tmp_path))
    assert_one_line_error(code, err, 1, "folder" if "folder" in err else "director")

    text = tmp_path / "notes.tif"
    text.write_text("this is not a raster\n" * 10)
    code, _, err = run(capsys, "info", str(text))
    assert_one_line_error(code, err, 1, "notes.tif")

    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(nc_stack.read_bytes()[:2000])
    code, _, err = run(capsys, "info", str(truncated))
    assert_one_line_error(code, err, 1, "truncated.tif")


def test_info_no_crs_is_reported_not_fatal(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # `info` describes what is there: a raster without CRS is a valid answer, not an error.
    p = tmp_path / "nocrs.tif"
    with rasterio.open(p, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 8, 8), np.uint8))
    code, out, _ = run(capsys, "info", str(p), "--json")
    assert code == 0 and json.loads(out)["crs"] is None


def test_segment_without_crs_fails_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "photo.tif"
    with rasterio.open(p, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8") as dst:
        dst.write(np.full((3, 64, 64), 7, np.uint8))
    code, _, err = run(capsys, "segment", str(p), "-m", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "o"))
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_demo_bad_data_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from geovae.demo import CPU_ENVIRONMENT, CPU_ENVIRONMENT_REMOVED

    # The command pins torch's CPU environment for its process before it checks --data; the
    # variables are restored at the end of the test, before any later test's MKL reads them.
    for name in (*CPU_ENVIRONMENT, *CPU_ENVIRONMENT_REMOVED):
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)
    code, _, err = run(capsys, "demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, 1, "--data")
    (tmp_path / "half").mkdir()
    with rasterio.open(
        tmp_path / "half" / "strata.tif",
        "w",
        driver="GTiff",
        width=4,
        height=4,
        count=1,
        dtype="uint8",
        crs="EPSG:3358",
        transform=from_origin(0, 0, 1, 1),
    ) as dst:
        dst.write(np.ones((1, 4, 4), np.uint8))
    code, _, err = run(capsys, "demo", "--data", str(tmp_path / "half"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, 1, "lsat7_2000_10.tif")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_refuses_a_missing_gpu_before_making_its_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nc_demo_data: Path
) -> None:
    from geovae.demo import CPU_ENVIRONMENT, CPU_ENVIRONMENT_REMOVED

    for name in (*CPU_ENVIRONMENT, *CPU_ENVIRONMENT_REMOVED):  # restored after the test, as above
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)
    out = tmp_path / "new" / "o"
    code, _, err = run(capsys, "demo", "--data", str(nc_demo_data), "--out", str(out), "--device", "cuda")
    assert_one_line_error(code, err, 2, "no CUDA device")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("data", ["window", pytest.param("real", marks=pytest.mark.slow)])
def test_demo_end_to_end_on_the_real_scene(tmp_path: Path, request: pytest.FixtureRequest, data: str) -> None:
    """The README's first command, shortened to one epoch: real Landsat-7 bands in the demo's
    file formats in (the committed window, or the whole scene from the real-data folder), a
    trained model file, georeferenced rasters, polygons, a PNG and a score out."""
    from conftest import NC, data_path, fixture_path

    if data == "window":
        nc_demo_data, scene = request.getfixturevalue("nc_demo_data"), fixture_path(NC, "nc_lsat7_2000_6band_uint8.tif")
    else:
        nc_demo_data, scene = data_path(NC, "original"), data_path(NC, "nc_lsat7_2000_6band_uint8.tif")
    out = tmp_path / "demo"
    # In a process of its own: the command pins MKL's and ATen's CPU settings, which those
    # libraries read once, on first use, and would keep for every later test of this process.
    cmd = [sys.executable, "-m", "geovae", "demo", "--data", str(nc_demo_data), "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--epochs", "1", "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    code, stdout, err = proc.returncode, proc.stdout, proc.stderr
    assert code == 0, err
    assert "mIoU on the east half (held out):" in stdout and "uncertainty AUROC for errors: 0." in stdout
    report = json.loads((out / "demo.json").read_text())
    assert 0.0 < report["evaluation"]["miou"] <= 1.0
    assert 0.0 < report["evaluation"]["auroc_uncertainty"] < 1.0
    assert report["numerics"]["threads"] == 2
    with (
        rasterio.open(out / "nc_lsat7_2000.classes.tif") as src,
        rasterio.open(scene) as ref,
    ):
        assert (src.crs, src.transform, src.shape) == (ref.crs, ref.transform, ref.shape)
        classes = src.read(1)
    assert set(np.unique(classes)) <= {1, 2, 3, 4, 5, 6, 7, 255} and len(np.unique(classes)) >= 2
    gj = json.loads((out / "nc_lsat7_2000.geojson").read_text())
    assert gj["features"] and {"class_id", "area_m2"} <= set(gj["features"][0]["properties"])
    assert (out / "nc_lsat7_2000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.tmp"))


def test_console_entry_point_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "geovae", "info", str(tmp_path / "nope.tif")], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("geovae: error: ") and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-init 3-band VAE segmenter in a model file (the CLI only needs the file)."""
    import torch

    from geovae.model import ModelInfo
    from geovae.model.io import save_model
    from geovae.model.vae import VAESegmenter

    torch.manual_seed(0)
    module = VAESegmenter(3, 4, base_channels=8, depth=3, latent_channels=4).eval()
    info = ModelInfo(
        in_channels=3,
        num_classes=4,
        class_ids=[1, 2, 3, 4],
        class_names=["water", "forest", "field", "town"],
        mean=[60.0] * 3,
        std=[40.0] * 3,
        tile_size=64,
        stride=module.stride,
        arch=module.hparams,
    )
    return save_model(tmp_path_factory.mktemp("model") / "rgb.safetensors", module, info)


def test_segment_vectorize_evaluate_through_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, rgb_byte: Path, rgb_model: Path
) -> None:
    out = tmp_path / "out"
    code, text, err = run(
        capsys,
        "-q",
        "segment",
        str(rgb_byte),
        "-m",
        str(rgb_model),
        "-o",
        str(out),
        "--tile",
        "64",
        "--overlap",
        "16",
        "--samples",
        "2",
        "--formats",
        "geojson,gpkg",
    )
    assert code == 0, err
    for suffix in ("classes.tif", "confidence.tif", "uncertainty.tif", "geojson", "gpkg", "png", "json"):
        assert (out / f"RGB.byte.{suffix}").is_file(), suffix
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    with rasterio.open(rgb_byte) as src, rasterio.open(out / "RGB.byte.classes.tif") as cls:
        assert (cls.crs, cls.transform, cls.shape) == (src.crs, src.transform, src.shape)
        # the nodata frame of the input stays nodata in the class raster
        frame = src.dataset_mask() == 0
        assert frame.any() and (cls.read(1)[frame] == cls.nodata).all()

    code, text, err = run(
        capsys,
        "vectorize",
        str(out / "RGB.byte.classes.tif"),
        "--out",
        str(tmp_path / "p.parquet"),
        "--confidence",
        str(out / "RGB.byte.confidence.tif"),
    )
    assert code == 0, err and (tmp_path / "p.parquet").is_file()
    import geopandas as gpd

    gdf = gpd.read_parquet(tmp_path / "p.parquet")
    assert len(gdf) > 0 and gdf["confidence_mean"].between(0, 1).all()
    assert set(gdf["class_name"]) <= {"water", "forest", "field", "town"}

    # scoring a prediction against itself is perfect
    code, text, err = run(
        capsys, "evaluate", str(out / "RGB.byte.classes.tif"), "--labels", str(out / "RGB.byte.classes.tif"), "--json"
    )
    assert code == 0, err and json.loads(text)["miou"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "opts, expected",
    [
        (["--tile", "64", "--overlap", "64"], 2),  # overlap must be smaller than the tile
        (["--tile", "60"], 2),  # not a multiple of the model's stride
        (["--batch-size", "0"], 2),
    ],
)
def test_segment_bad_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, nc_rgb: Path, rgb_model: Path, opts: list[str], expected: int
) -> None:
    code, _, err = run(capsys, "segment", str(nc_rgb), "-m", str(rgb_model), "-o", str(tmp_path / "o"), *opts)
    assert code == expected and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_segment_bad_inputs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, nc_stack: Path, nc_rgb: Path, rgb_model: Path
) -> None:
    # six bands into a three-band model
    code, _, err = run(capsys, "segment", str(nc_stack), "-m", str(rgb_model), "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, 1, "band")
    # the output "folder" is a file
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run(capsys, "segment", str(nc_rgb), "-m", str(rgb_model), "-o", str(f))
    assert code == 2 and "is a file" in err and "Traceback" not in err  # click rejects it as a usage error
    from geovae.errors import OutputError
    from geovae.segment import segment_scene

    with pytest.raises(OutputError):
        segment_scene(nc_rgb, rgb_model, f, progress=False)
    # a model file that is not one
    code, _, err = run(capsys, "segment", str(nc_rgb), "-m", str(f), "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, 1)
    # an all-nodata scene
    empty = tmp_path / "empty.tif"
    with rasterio.open(
        empty,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=3,
        dtype="uint8",
        nodata=0,
        crs="EPSG:32618",
        transform=from_origin(0, 0, 30, 30),
    ) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    code, _, err = run(capsys, "segment", str(empty), "-m", str(rgb_model), "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, 1, "nodata")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_segment_a_folder_runs_the_local_batch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Several scenes, or a folder, go to the local batch runner: one sub-folder per scene,
    a manifest and a STAC catalog; a folder of no scene is one line."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        from batch_dask import halves
    finally:
        sys.path.pop(0)
    from conftest import fixture_path
    from test_outputs import _model_for

    scene = fixture_path("nc_landsat7_landclass96", "nc_lsat7_2000_6band_uint8.tif")
    folder = tmp_path / "scenes"
    parts = halves(scene, folder)
    model = _model_for(scene, tmp_path / "m.safetensors")
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "-q",
        "segment",
        str(folder),
        "-m",
        str(model),
        "-o",
        str(out),
        "--tile",
        "128",
        "--formats",
        "gpkg",
        "--no-quicklook",
    )
    assert code == 0, err
    assert "done 2, skipped 0, failed 0" in stdout and "catalog.json" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.csv", "catalog.json", "collection.json", *(p.stem for p in parts)]
    )
    for p in parts:
        assert (out / p.stem / f"{p.stem}.classes.tif").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "segment", str(empty), "-m", str(model), "-o", str(out))
    assert_one_line_error(code, err, 2, "holds no scene")  # a usage error, like every OptionError


def test_no_warnings_around_the_one_line_messages(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, nc_stack: Path
) -> None:
    """A pickled model (torch's `Detected pickle protocol 4` UserWarning) and a scene in pixel
    coordinates (rasterio's NotGeoreferencedWarning, pyogrio's `'crs' was not provided`)
    printed warnings around the one-line message and the outputs. Warnings are recorded
    with the "always" action (after any filter geovae sets), so one shown earlier in this
    process cannot hide them."""
    import collections
    import pickle
    import warnings

    import torch

    from geovae.model import ModelInfo, VAESegmenter
    from geovae.model.io import save_model

    pkl = tmp_path / "m.pkl"
    pkl.write_bytes(pickle.dumps(collections.OrderedDict(a=1), protocol=4))
    photo = tmp_path / "photo.tif"
    with rasterio.open(nc_stack) as src:
        data = src.read(window=((200, 264), (200, 264)))
    with rasterio.open(photo, "w", driver="GTiff", width=64, height=64, count=6, dtype="uint8") as dst:
        dst.write(data)
    torch.manual_seed(0)
    model = save_model(
        tmp_path / "m.safetensors",
        VAESegmenter(6, 2, base_channels=4, depth=2, latent_channels=2).eval(),
        ModelInfo(in_channels=6, num_classes=2, mean=[80.0] * 6, std=[30.0] * 6, tile_size=64),
    )
    with warnings.catch_warnings(record=True) as seen:
        # Appended: geovae's own filters, made during the run, come first.
        warnings.filterwarnings("always", append=True)
        code, _, err = run(capsys, "segment", str(nc_stack), "-m", str(pkl), "-o", str(tmp_path / "a"))
        assert_one_line_error(code, err, 1, "pickled Python objects")
        code, _, err = run(
            capsys,
            "segment",
            str(photo),
            "-m",
            str(model),
            "-o",
            str(tmp_path / "b"),
            "--pixel-coords",
            "--formats",
            "gpkg,parquet",
            "--force",
            "-q",
        )
        assert code == 0 and err == "", err
    assert [str(w.message) for w in seen if issubclass(w.category, UserWarning)] == []


def test_libtiff_prints_nothing_once_quieted(tmp_path: Path) -> None:
    """libtiff printed `_tiffWriteProc: No space left on device.` straight to stderr around the
    one-line disk-full message. A write past a file-size limit makes it print the same way
    (EFBIG instead of ENOSPC, no root needed); quieted, it prints nothing."""
    code = (
        "import resource, signal, sys\n"
        "import numpy as np, rasterio\n"
        "if sys.argv[1] == 'quiet':\n"
        "    from geovae.native import quiet_native_output\n"
        "    quiet_native_output()\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    with rasterio.open(sys.argv[2], 'w', driver='GTiff', width=256, height=256, count=1,\n"
        "                       dtype='float32', crs='EPSG:32617', transform=rasterio.Affine(10, 0, 5e5, 0, -10, 4e6)) as d:\n"
        "        d.write(np.random.default_rng(0).random((256, 256), dtype=np.float32), 1)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__)\n"
    )
    results = {}
    for mode in ("loud", "quiet"):
        p = subprocess.run(
            [sys.executable, "-c", code, mode, str(tmp_path / f"{mode}.tif")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.stdout.strip() == "RasterioIOError", (p.stdout, p.stderr)
        results[mode] = p.stderr
    assert "_tiffWriteProc" in results["loud"]  # the test can see what it checks
    assert results["quiet"] == ""
