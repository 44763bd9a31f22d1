"""The output-set contract: no run overwrites an input, mixes its files with another run's,
or leaves a half-replaced set."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import rasterio

from geovae.atomic import OutputSet
from geovae.cli import main
from geovae.errors import OutputError

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


STEM = "nc_lsat7_2000_6band_uint8"


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed window of the real NC Landsat-7 scene."""
    from conftest import fixture_path

    return fixture_path("nc_landsat7_landclass96", f"{STEM}.tif")


def _model_for(image: Path, path: Path) -> Path:
    """A small random VAE file normalised like ``image`` (so the trust check passes)."""
    import torch

    from geovae.bands import band_statistics
    from geovae.model.base import ModelInfo
    from geovae.model.io import save_model
    from geovae.model.vae import VAESegmenter

    st = band_statistics(image)
    c = len(st.mean)
    torch.manual_seed(0)
    m = VAESegmenter(c, 3, base_channels=8, depth=3, latent_channels=4).eval()
    info = ModelInfo(
        in_channels=c,
        num_classes=3,
        class_names=["water", "forest", "town"],
        mean=st.mean,
        std=st.std,
        tile_size=64,
        training={"dtype": st.dtype, "quantiles": st.quantiles},
    )
    return save_model(path, m, info)


@pytest.fixture(scope="module")
def model(scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_for(scene, tmp_path_factory.mktemp("m") / "m6.safetensors")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_outputs_never_overwrite_an_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene: Path, model: Path
) -> None:
    # A PNG scene segmented into its own folder: the quicklook is <stem>.png, the scene itself.
    pngdir = tmp_path / "pngdir"
    pngdir.mkdir()
    with rasterio.open(scene) as src:
        data = src.read([3, 2, 1], window=((0, 128), (64, 192)))
    png = pngdir / "plain.png"
    with rasterio.open(png, "w", driver="PNG", width=128, height=128, count=3, dtype="uint8") as dst:
        dst.write(data)
    rgb = _model_for(png, tmp_path / "rgb.safetensors")
    before = png.read_bytes()
    code, err = run(capsys, "segment", str(png), "-m", str(rgb), "-o", str(pngdir), "--pixel-coords")
    assert code == 1 and err.count("\n") == 1 and "would destroy the input" in err, err
    assert png.read_bytes() == before and sorted(p.name for p in pngdir.iterdir()) == ["plain.png"]
    # A hard link to the scene under an output's name is the scene too.
    out = tmp_path / "out"
    out.mkdir()
    os.link(scene, out / f"{STEM}.classes.tif")
    code, err = run(capsys, "segment", str(scene), "-m", str(model), "-o", str(out))
    assert code == 1 and "same file as the input" in err, err
    # The model file in the output folder under an output's name.
    (out / f"{STEM}.classes.tif").unlink()
    os.link(model, out / f"{STEM}.json")
    code, err = run(capsys, "segment", str(scene), "-m", str(model), "-o", str(out))
    assert code == 1 and "input" in err and (out / f"{STEM}.json").read_bytes() == model.read_bytes()


def test_two_runs_into_one_set_never_mix(tmp_path: Path, scene: Path, model: Path) -> None:
    """Two `geovae segment` processes into one folder at once: one completes, the other is
    refused with one line, and the set on disk is one run's, consistent with its report."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "geovae", "-q", "segment", str(scene), "-m", str(model), "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for extra in (["--samples", "2"], ["--formats", "gpkg"])
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(c for c, _ in results)
    assert codes in ([0, 0], [0, 1]), results
    for code, err in results:
        if code:
            assert err.strip().count("\n") == 0 and "another geovae run is writing" in err, err
    report = json.loads((out / f"{STEM}.json").read_text())
    listed = set(report["outputs"].values())
    assert listed == {p.name for p in out.iterdir()}, "the folder holds exactly the files its report lists"
    assert (f"{STEM}.uncertainty.tif" in listed) == (report["options"]["samples"] == 2)
    assert (f"{STEM}.gpkg" in listed) == ("gpkg" in report["options"]["formats"])


def test_lock_refuses_a_second_run_and_is_released(tmp_path: Path) -> None:
    with OutputSet(tmp_path, "scene"):
        with pytest.raises(OutputError, match="another geovae run is writing the outputs of scene"):
            OutputSet(tmp_path, "scene").open()
        with OutputSet(tmp_path, "other"):  # another scene's set is independent
            pass
    with OutputSet(tmp_path, "scene"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_leaves_the_previous_set_byte_identical(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    code, err = run(capsys, "-q", "segment", str(scene), "-m", str(model), "-o", str(out), "--formats", "gpkg")
    assert code == 0, err
    before = _digest(out)
    # A full disk while the polygons are written (ENOSPC in a format writer thread).
    import geovae.vector.formats

    def full(*a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(geovae.vector.formats, "write_format", full)
    code, err = run(
        capsys,
        "-q",
        "segment",
        str(scene),
        "-m",
        str(model),
        "-o",
        str(out),
        "--samples",
        "2",
        "--formats",
        "gpkg,geojson",
    )
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("geovae: error: no space left on the device of")
    assert "free some space" in err and _digest(out) == before
    # Any other failure after the rasters (here an internal error) leaves it as well.
    monkeypatch.setattr(geovae.vector.formats, "write_format", lambda *a, **k: 1 / 0)
    code, err = run(capsys, "-q", "segment", str(scene), "-m", str(model), "-o", str(out), "--samples", "2")
    assert code == 1 and "internal error" in err and _digest(out) == before


def test_a_rerun_replaces_the_whole_set(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene: Path, model: Path
) -> None:
    out = tmp_path / "out"
    assert (
        run(
            capsys,
            "-q",
            "segment",
            str(scene),
            "-m",
            str(model),
            "-o",
            str(out),
            "--samples",
            "2",
            "--formats",
            "gpkg,geojson",
        )[0]
        == 0
    )
    assert (out / f"{STEM}.uncertainty.tif").exists() and (out / f"{STEM}.geojson").exists()
    keep = out / "notes.txt"  # not geovae's: never touched
    keep.write_text("mine")
    assert (
        run(
            capsys, "-q", "segment", str(scene), "-m", str(model), "-o", str(out), "--formats", "gpkg", "--no-quicklook"
        )[0]
        == 0
    )
    report = json.loads((out / f"{STEM}.json").read_text())
    assert set(report["outputs"].values()) == {p.name for p in out.iterdir()} - {"notes.txt"}
    assert not (out / f"{STEM}.uncertainty.tif").exists() and not (out / f"{STEM}.png").exists()
    assert keep.read_text() == "mine"


def test_the_folder_is_created_only_after_every_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene: Path, model: Path
) -> None:
    out = tmp_path / "deep" / "out"
    code, err = run(capsys, "segment", str(scene), "-m", str(model), "-o", str(out), "--tile", "60")
    assert code == 2 and "--tile" in err and not (tmp_path / "deep").exists()
    three = tmp_path / "three.tif"
    with rasterio.open(scene) as src:
        prof = src.profile | {"count": 3}
        with rasterio.open(three, "w", **prof) as dst:
            dst.write(src.read([1, 2, 3]))
    code, err = run(capsys, "segment", str(three), "-m", str(model), "-o", str(out))
    assert code == 1 and "bands" in err and not (tmp_path / "deep").exists()


@pytest.mark.parametrize("stem", ["s", "a[1]", "b*?"])
def test_a_commit_killed_midway_is_finished_by_the_next_run(tmp_path: Path, stem: str) -> None:
    """Also for a scene whose name is a glob pattern: "a[1]" matched only ".a1...", so its
    next run neither replayed the killed run's journal nor removed its staging folder."""
    a, b, r = f"{stem}.a", f"{stem}.b", f"{stem}.json"
    old = OutputSet(tmp_path, stem)
    with old:
        for n in (a, b, r):
            old.path(n).write_text("old")
        old.commit([a, b], last=r)
    # A run that died after its journal and first rename: the next run into the set (under
    # the lock) replays it, so the folder never stays half old, half new.
    new = OutputSet(tmp_path, stem)
    new.open()
    for n in (a, b, r):
        new.path(n).write_text("new")
    (new.staging / ".commit.json").write_text(json.dumps({"moves": [a, b, r], "remove": [], "last": r}))
    (tmp_path / r).unlink()
    os.replace(new.staging / a, tmp_path / a)
    new._release_lock()  # the process died here
    with OutputSet(tmp_path, stem):
        pass
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {a: "new", b: "new", r: "new"}


def _killed(s: OutputSet) -> None:
    """``s``'s process dies: its lock goes with its file descriptor, the lock file stays."""
    assert s._lock_fd is not None
    os.close(s._lock_fd)
    s._lock_fd = None


def test_clear_abandoned_puts_a_folder_in_order_after_killed_runs(tmp_path: Path) -> None:
    """A stopped batch kills its workers mid-scene; their staging folders (a whole set of
    rasters) and lock files stayed until the next run into each set. clear_abandoned
    finishes a commit left half done, removes the rest, and leaves a live run's set alone."""
    from geovae.atomic import clear_abandoned

    half = OutputSet(tmp_path, "half")  # killed after its journal and first rename
    half.open()
    for n in ("half.a", "half.json"):
        half.path(n).write_text("new")
    (half.staging / ".commit.json").write_text(json.dumps({"moves": ["half.a", "half.json"], "remove": []}))
    os.replace(half.staging / "half.a", tmp_path / "half.a")
    _killed(half)
    dead = OutputSet(tmp_path, "dead")  # killed while writing
    dead.open()
    dead.path("dead.tif").write_bytes(b"x" * 1000)
    _killed(dead)
    live = OutputSet(tmp_path, "live")  # still running
    live.open()
    live.path("live.tif").write_text("staged")
    try:
        assert clear_abandoned(tmp_path) == ["dead", "half"]
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["half.a", "half.json", live.staging.name, live.lock_path.name]), names
        assert (live.staging / "live.tif").read_text() == "staged"
    finally:
        live.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.a", "half.json"]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path: Path, scene: Path, model: Path) -> None:
    """SIGTERM mid-run (what schedulers send): exit 143, nothing under a final name, no staging."""
    out = tmp_path / "out"
    # 16-px tiles one at a time with 8 samples: slow enough to be stopped halfway.
    cmd = [
        sys.executable,
        "-m",
        "geovae",
        "-q",
        "segment",
        str(scene),
        "-m",
        str(model),
        "-o",
        str(out),
        "--tile",
        "16",
        "--overlap",
        "8",
        "--batch-size",
        "1",
        "--samples",
        "8",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob(".*.part")):
        time.sleep(0.05)
    assert any(out.glob(".*.part")), "the run never started writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert code == 143 and err.strip() == "geovae: terminated", err
    assert not out.exists()  # nothing left behind, not even the folder the run made


def test_vectorize_keeps_other_geopackage_layers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, nc_labels: Path
) -> None:
    import geopandas as gpd
    import pyogrio
    import shapely

    gpkg = tmp_path / "d.gpkg"
    gpd.GeoDataFrame({"name": ["road"]}, geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:3358").to_file(
        gpkg, layer="basemap", engine="pyogrio"
    )
    code, err = run(capsys, "vectorize", str(nc_labels), "-o", str(gpkg))
    assert code == 0, err
    layers = dict(pyogrio.list_layers(gpkg))
    assert set(layers) == {"basemap", "nc_landclass96_label_uint8"}
    n = len(gpd.read_file(gpkg, layer="nc_landclass96_label_uint8"))
    code, err = run(capsys, "vectorize", str(nc_labels), "-o", str(gpkg), "--min-area", "100000")
    assert code == 0 and set(dict(pyogrio.list_layers(gpkg))) == set(layers)
    assert 0 < len(gpd.read_file(gpkg, layer="nc_landclass96_label_uint8")) < n
    assert gpd.read_file(gpkg, layer="basemap")["name"].tolist() == ["road"]
    code, err = run(capsys, "vectorize", str(nc_labels), "-o", str(gpkg), "-o", str(gpkg))
    assert code == 2 and "given twice" in err and err.count("\n") == 1


def test_model_files_with_broken_numbers_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene: Path, model: Path
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(model), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    ok = json.loads(meta["info"])["std"]
    for field, value, said in (
        ("std", [0.0, *ok[1:]], "std[0] is 0.0"),
        ("mean", [float("nan"), *ok[1:]], "mean[0]"),
        ("class_ids", [0, 1, 300], "class id 300"),
        ("tile_size", 60, "tile_size 60"),
    ):
        info = json.loads(meta["info"])
        info[field] = value
        bad = tmp_path / f"bad-{field}.safetensors"
        save_file(tensors, str(bad), metadata={**meta, "info": json.dumps(info)})
        code, err = run(capsys, "segment", str(scene), "-m", str(bad), "-o", str(tmp_path / "o"))
        assert code == 1 and err.count("\n") == 1 and said in err, (field, err)
        assert not (tmp_path / "o").exists()


def test_pixel_coordinates_name_areas_in_pixels(tmp_path: Path, model: Path, scene: Path) -> None:
    import geopandas as gpd

    from geovae.segment import segment_scene

    p = tmp_path / "photo.tif"
    with rasterio.open(scene) as src:
        data = src.read(window=((40, 104), (100, 164)))
    with rasterio.open(p, "w", driver="GTiff", width=64, height=64, count=6, dtype="uint8") as dst:
        dst.write(data)
    r = segment_scene(p, model, tmp_path / "o", pixel_coords=True, formats=("gpkg", "parquet"), progress=False)
    for kind in ("gpkg", "parquet"):
        gdf = gpd.read_parquet(r.outputs[kind]) if kind == "parquet" else gpd.read_file(r.outputs[kind])
        assert "area_px" in gdf.columns and "area_m2" not in gdf.columns
        assert gdf["area_px"].sum() == 64 * 64
    assert all("area_px" in c and "area_m2" not in c for c in r.report["classes"])


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for args, said in (
        (["segment"], "Missing argument"),
        (["segment", "x.tif"], "--model"),
        (["frobnicate"], "No such command"),
        (["segment", "x", "-m", "m", "-o", "o", "--tile", "0"], "--tile"),
    ):
        code, err = run(capsys, *args)
        assert code == 2 and err.startswith("geovae: error: ") and err.count("\n") == 1 and said in err, err


def test_threads_in_one_process_do_not_share_temporary_names(tmp_path: Path, scene: Path, model: Path) -> None:
    """Two library calls at once writing the same polygon file: each writes its own staging."""
    from geovae.segment import segment_scene
    from geovae.vector import vectorize

    r = segment_scene(scene, model, tmp_path / "o", formats=(), quicklook=False, progress=False)
    errors: list[BaseException] = []

    def go() -> None:
        try:
            vectorize(r.outputs["classes"], tmp_path / "p.gpkg")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    import geopandas as gpd

    assert len(gpd.read_file(tmp_path / "p.gpkg")) > 0


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_commit_never_leaves_files_without_their_report(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    scene: Path,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
    signame: str,
) -> None:
    """SIGTERM or Ctrl-C between two renames of the commit (the moment the old report is
    gone) left the old files without a report, or 13 new files without one in an empty
    folder. The stop now takes effect after the last rename: exit 143/130 with one line, and
    the folder holds exactly the new set its report lists."""
    import geovae.atomic

    signum = getattr(signal, signame)
    out = tmp_path / "out"
    args = ["-q", "segment", str(scene), "-m", str(model), "-o", str(out), "--formats", "gpkg", "--no-quicklook"]
    real = os.replace
    for first in (True, False):  # into an empty folder, then over the previous set
        calls = [0]

        def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], calls: list[int] = calls) -> None:
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signum)
            real(src, dst)

        monkeypatch.setattr(geovae.atomic, "_rename", rename)
        code, err = run(capsys, *args, *([] if first else ["--samples", "2"]))
        assert code == (143 if signum == signal.SIGTERM else 130), err
        assert err.strip() == ("geovae: terminated" if signum == signal.SIGTERM else "geovae: interrupted")
        assert calls[0] > 3
        report = json.loads((out / f"{STEM}.json").read_text())
        assert set(report["outputs"].values()) == {p.name for p in out.iterdir()}
        assert (f"{STEM}.uncertainty.tif" in report["outputs"].values()) == (not first)


def _disk_full_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """The filesystem of every output has 4 KB left (what a write that filled it sees)."""
    import geovae.atomic

    monkeypatch.setattr(geovae.atomic, "_free", lambda folder: 4096)


def test_a_disk_that_fills_during_the_cog_copies_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GDAL says only `TIFFRewriteDirectory:Error fetching directory count` (a CPLE_AppDefinedError,
    not an OSError) when the disk fills during a COG copy: that was an internal error, and an
    empty output folder was left behind."""
    from rasterio._err import CPLE_AppDefinedError

    import geovae.sinks.rasters

    def full(*a: object, **k: object) -> None:
        raise CPLE_AppDefinedError(1, 1, "TIFFRewriteDirectory:Error fetching directory count")

    monkeypatch.setattr(geovae.sinks.rasters, "write_cog", full)
    _disk_full_now(monkeypatch)
    out = tmp_path / "new" / "out"
    code, err = run(capsys, "-q", "segment", str(scene), "-m", str(model), "-o", str(out), "--no-quicklook")
    assert code == 1 and err.count("\n") == 1 and err.startswith("geovae: error: no space left on the device"), err
    assert not (tmp_path / "new").exists()  # the folders the run made are gone with it


def test_gdal_warnings_of_a_cog_copy_that_fills_the_disk_are_not_printed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COG copy that filled the disk made GDAL warn "A strile cannot be rewritten in place"
    (through rasterio's logger) before the disk-full line: two lines. A copy that succeeds
    keeps its warnings."""
    import logging

    import rasterio.shutil
    from rasterio._err import CPLE_AppDefinedError

    import geovae.sinks.rasters

    real = rasterio.shutil.copy
    said = "CPLE_AppDefined in x.tif: A strile cannot be rewritten in place"

    def copy(*a: object, fail: bool, **k: object) -> None:
        logging.getLogger("rasterio._env").warning(said)
        if fail:
            raise CPLE_AppDefinedError(1, 1, "TIFFRewriteDirectory:Error fetching directory count")
        real(*a, **k)

    _disk_full_now(monkeypatch)
    out = tmp_path / "out"
    args = ["segment", str(scene), "-m", str(model), "-o", str(out), "--no-quicklook", "--formats", "gpkg"]
    monkeypatch.setattr(geovae.sinks.rasters.rasterio.shutil, "copy", lambda *a, **k: copy(*a, fail=True, **k))
    code, err = run(capsys, *args)
    assert code == 1 and err.startswith("geovae: error: no space left on the device"), err
    assert err.count("\n") == 1, err
    assert not out.exists()
    monkeypatch.undo()
    monkeypatch.setattr(geovae.sinks.rasters.rasterio.shutil, "copy", lambda *a, **k: copy(*a, fail=False, **k))
    code, err = run(capsys, *args)
    assert code == 0 and err.count(said) == 2, err  # the classes and the confidence COG


def test_vectorize_onto_a_full_disk_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, nc_labels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite says `database or disk is full` (pyogrio's DataLayerError, a RuntimeError); a
    later write says nothing about why (FeatureError) on a disk with no space left."""
    import pyogrio.errors

    import geovae.vector.formats

    for exc, low in (
        (pyogrio.errors.DataLayerError("sqlite3_exec(COMMIT) failed: database or disk is full"), False),
        (pyogrio.errors.FeatureError("Could not add feature to layer at index 0"), True),
    ):

        def full(*a: object, exc: BaseException = exc, **k: object) -> None:
            raise exc

        monkeypatch.setattr(geovae.vector.formats, "write_format", full)
        if low:
            _disk_full_now(monkeypatch)
        code, err = run(capsys, "vectorize", str(nc_labels), "-o", str(tmp_path / "p.gpkg"))
        assert code == 1 and err.count("\n") == 1 and "no space left on the device" in err, err
        assert list(tmp_path.iterdir()) == []


def test_a_scene_name_too_long_for_its_outputs_is_refused_before_any_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene: Path, model: Path
) -> None:
    """A 230-character scene name failed with `[Errno 36] File name too long` (an internal
    error) after making the output folder; names are measured in bytes (é is two)."""
    for stem in ("a" * 230, "é" * 120):
        link = tmp_path / f"{stem}.tif"
        link.symlink_to(scene)
        out = tmp_path / "o"
        code, err = run(capsys, "segment", str(link), "-m", str(model), "-o", str(out))
        assert code == 1 and err.count("\n") == 1 and "is too long" in err and "bytes" in err, err
        assert not out.exists()
    ok = tmp_path / f"{'b' * 150}.tif"
    ok.symlink_to(scene)
    code, err = run(capsys, "-q", "segment", str(ok), "-m", str(model), "-o", str(tmp_path / "o"), "--no-quicklook")
    assert code == 0, err
