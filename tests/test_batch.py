"""Batch processing on dask.distributed: manifest, resume markers, model cache, cluster, faults.

The cluster tests start a real ``dask scheduler`` and two ``dask worker`` processes on
127.0.0.1 and segment real scenes from the shared data folder with a tiny model.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geovae import batch
from geovae.batch import (
    MARKER_NAME,
    ModelCache,
    SceneRow,
    check_marker,
    read_manifest,
    read_scene_list,
    scene_folders,
    write_manifest,
    write_marker,
)
from geovae.errors import ClusterError, ModelFileError, OptionError, OutputError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ pure helpers
def test_scene_folders_unique_and_stable(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "x.tif", tmp_path / "b" / "x.tif"
    f1 = scene_folders([str(a), str(b), str(tmp_path / "y.TIF"), "https://host/p/z.tif?sig=1"])
    assert f1[2:] == ["y", "z"]
    assert f1[0] != f1[1] and f1[0].startswith("x-") and f1[1].startswith("x-")
    # The folder of a scene does not depend on the order of the list (resume relies on it).
    f2 = scene_folders([str(b), str(tmp_path / "y.TIF"), str(a)])
    assert f2 == [f1[1], "y", f1[0]]


def test_read_scene_list_relative_to_list(tmp_path: Path) -> None:
    lst = tmp_path / "sub" / "scenes.txt"
    lst.parent.mkdir()
    lst.write_text("# comment\n\nlocal.tif\n/abs/other.tif\n  s3://bucket/k.tif  \n")
    assert read_scene_list(lst) == [str(lst.parent / "local.tif"), "/abs/other.tif", "s3://bucket/k.tif"]
    with pytest.raises(OptionError, match="--list"):
        read_scene_list(tmp_path / "missing.txt")


def test_manifest_roundtrip_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    rows = [
        SceneRow(
            "s1.tif",
            "s1",
            "done",
            "",
            "2026-01-01T00:00:00+00:00",
            "2026-01-01T00:00:02+00:00",
            2.0,
            "tcp://w",
            ["s1/s1.classes.tif", "s1/s1.geojson"],
        ),
        SceneRow("s2.tif", "s2", "failed", 's2.tif: no such file, check the path, "quoted"'),
    ]
    write_manifest(path, rows)
    got = read_manifest(path)
    assert [r["status"] for r in got] == ["done", "failed"]
    assert got[0]["outputs"].split(";") == ["s1/s1.classes.tif", "s1/s1.geojson"]
    assert got[1]["error"] == rows[1].error and got[1]["seconds"] == ""
    assert list(got[0]) == list(batch.MANIFEST_COLUMNS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv"]  # no temp file left


def test_marker_vouches_for_exact_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    files = []
    for name, data in (("s.classes.tif", b"\x01" * 1000), ("s.geojson", b'{"type": "FeatureCollection"}')):
        (folder / name).write_bytes(data)
        files.append(folder / name)
    fp = {"model": {"path": "/m", "size": 1, "mtime_ns": 2}, "options": {"tile": [64]}}
    assert check_marker(folder, fp) is None  # no marker yet
    write_marker(folder, "s.tif", files, fp)
    assert sorted(p.name for p in check_marker(folder, fp) or []) == ["s.classes.tif", "s.geojson"]
    # Another model version or other options: the marker no longer counts.
    assert check_marker(folder, {**fp, "options": {"tile": [128]}}) is None
    # Same size, one byte changed (a torn rewrite): caught by the checksum.
    data = bytearray(files[0].read_bytes())
    data[500] ^= 0xFF
    files[0].write_bytes(bytes(data))
    assert check_marker(folder, fp) is None
    write_marker(folder, "s.tif", files, fp)
    files[1].unlink()
    assert check_marker(folder, fp) is None
    (folder / MARKER_NAME).write_text("{not json")
    assert check_marker(folder, fp) is None


def test_model_cache_loads_once_per_version(tmp_path: Path) -> None:
    loads: list[tuple[str, str]] = []

    def loader(path: str, device: str) -> object:
        time.sleep(0.05)  # widen the race window between threads
        loads.append((path, device))
        return object()

    cache = ModelCache(loader)  # type: ignore[arg-type]
    model = tmp_path / "m.bin"
    model.write_bytes(b"v1")
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(model, "cpu"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and cache.loads == 1
    assert all(g is got[0] for g in got)
    # A new version of the file (other size) is read again and replaces the old one.
    model.write_bytes(b"version 2")
    assert cache.get(model, "cpu") is not got[0]
    assert cache.loads == 2 and len(cache._models) == 1
    # The cache travels to workers pickled: it arrives empty, with its loader.
    import pickle

    clone = pickle.loads(pickle.dumps(ModelCache()))
    assert clone.loads == 0 and clone._models == {}


# ------------------------------------------------------------------ bad input
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_scheduler_is_a_cluster_error() -> None:
    port = _free_port()  # bound then released: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as ei:
        batch.connect(f"tcp://127.0.0.1:{port}", connect_timeout=2)
    assert time.monotonic() - t0 < 60  # a generous bound: it must not hang
    msg = str(ei.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "--scheduler" in msg


def test_ctrl_c_while_the_local_cluster_starts_is_a_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal's Ctrl-C reaches the worker processes while they start, and kills them:
    the batch said it "cannot start a local Dask cluster" (exit 1) instead of stopping."""
    import signal

    import distributed

    from geovae import signals

    ctrl_c = [True]

    def starting(*a: object, **k: object) -> None:
        if ctrl_c[0]:
            signal.raise_signal(signal.SIGINT)  # the parent's handler records it; the workers die
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setattr(distributed, "LocalCluster", starting)
    with signals.installed(), pytest.raises(KeyboardInterrupt):
        batch.connect(None, workers=1)
    ctrl_c[0] = False
    with pytest.raises(ClusterError, match="cannot start a local Dask cluster"):  # no stop: the error
        batch.connect(None, workers=1)


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "out.txt"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        batch.run_batch([str(tmp_path / "s.tif")], tmp_path / "m", f, progress=False)


def test_no_scenes_is_an_option_error(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="no scenes"):
        batch.run_batch([], tmp_path / "m", tmp_path / "out", progress=False)


# ------------------------------------------------------------------ real scenes on a real cluster
#: Tiling for the tests: tiles and output blocks small enough that each committed scene spans
#: several of both (the 128-row RGB window splits into two bands). The scenes come from four sensors and one toy model reads them all: force past the trust check, which
#: rightly refuses uint16 Landsat for a model normalised for 8-bit RGB (tests/test_trust.py).
SEG = {"tile": 64, "overlap": 16, "batch_size": 4, "device": "cpu", "block_size": 48, "force": True}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3-band VAE segmenter file (random but fixed weights; the tests compare runs)."""
    import torch

    from geovae.model.base import ModelInfo
    from geovae.model.io import save_model
    from geovae.model.vae import VAESegmenter

    torch.manual_seed(0)
    module = VAESegmenter(3, 3, base_channels=4, depth=2, latent_channels=2).eval()
    info = ModelInfo(
        in_channels=3,
        num_classes=3,
        mean=[90.0, 90.0, 90.0],
        std=[40.0, 40.0, 40.0],
        tile_size=128,
        class_names=["dark", "mid", "bright"],
    )
    return save_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", module, info)


@pytest.fixture(scope="module")
def scenes() -> list[Path]:
    """Four real 3-band scenes (committed windows of them): RGB, RGBA (alpha is a mask, not a
    band), Albers int16, Landsat-8 uint16 with fill."""
    from conftest import fixture_path

    return [
        fixture_path("rasterio_testdata", "RGB.byte.tif"),
        fixture_path("rasterio_testdata", "RGBA.byte.tif"),
        fixture_path("spacenet_solaris", "original", "sample_geotiff_custom_proj.tif"),
        fixture_path("landsat8_parana", "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"),
    ]


def test_batch_never_writes_over_its_scene_list_or_model(
    scenes: list[Path], tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --list file kept in the output folder as manifest.csv was replaced by the manifest
    with exit 0; a list or model under the name of the manifest or the STAC catalog is
    refused with one line before any cluster starts, and left byte for byte."""
    from conftest import one_line, run

    out = tmp_path / "out"
    out.mkdir()
    listed = out / batch.MANIFEST_NAME
    listed.write_text(f"{scenes[0]}\n")
    code, _, err = run(capsys, "batch", "--list", str(listed), "-m", str(tiny_model), "-o", str(out))
    assert code == 1, err
    assert f"is the input {listed}; writing it would destroy the input; choose another --out folder" in one_line(err)
    assert listed.read_text() == f"{scenes[0]}\n"
    model = out / "catalog.json"
    model.write_bytes(tiny_model.read_bytes())
    code, _, err = run(capsys, "batch", str(scenes[0]), "-m", str(model), "-o", str(out))
    assert code == 1 and f"is the input {model}" in one_line(err)
    assert model.read_bytes() == tiny_model.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["catalog.json", "manifest.csv"]


def _unreachable(scene: Path, model: Path, out: Path, port: int) -> None:
    """A batch whose scheduler (a port nothing listens on) never answers."""
    with pytest.raises(ClusterError):
        batch.run_batch(
            [str(scene)],
            model,
            out,
            scheduler=f"tcp://127.0.0.1:{port}",
            connect_timeout=2,
            progress=False,
            **SEG,
        )


def test_unreachable_scheduler_leaves_no_manifest(scenes: list[Path], tiny_model: Path, tmp_path: Path) -> None:
    """Failing to connect writes nothing: no manifest of "pending" rows, and a previous
    run's manifest is left as it was."""
    port = _free_port()
    out = tmp_path / "out"
    _unreachable(scenes[0], tiny_model, out, port)
    assert not out.exists()  # not even the folder the run made
    out.mkdir()
    (out / batch.MANIFEST_NAME).write_text("previous run\n")
    _unreachable(scenes[0], tiny_model, out, port)
    assert (out / batch.MANIFEST_NAME).read_text() == "previous run\n"


def test_a_failed_batch_leaves_no_folder_it_made(
    scenes: list[Path], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch refused for its model, one whose scheduler does not answer, and one whose
    manifest finds the disk full left the (empty) output folders they had made."""
    import errno

    import geovae.batch.manifest
    from geovae.atomic import atomic_path

    out = tmp_path / "new" / "out"
    with pytest.raises(ModelFileError):
        batch.run_batch([str(scenes[0])], tmp_path / "missing.safetensors", out, progress=False, **SEG)
    assert not (tmp_path / "new").exists()
    _unreachable(scenes[0], tiny_model, out, _free_port())
    assert not (tmp_path / "new").exists()

    def full(path: Path, text: str) -> None:
        with atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device")

    # A scene the precheck refuses: the manifest is the batch's only write, and it fails.
    monkeypatch.setattr(geovae.batch.manifest, "write_text", full)
    with pytest.raises(OutputError, match="no space left on the device"):
        batch.run_batch([str(tmp_path / "absent.tif")], tiny_model, out, progress=False, **SEG)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(OutputError):
        batch.run_batch([str(tmp_path / "absent.tif")], tiny_model, tmp_path / "kept", progress=False, **SEG)
    assert (tmp_path / "kept").is_dir()  # a folder the user had stays


@pytest.fixture(scope="module")
def reference(scenes: list[Path], tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Single-process outputs of every scene: scene stem -> its folder."""
    import torch

    from geovae.segment import segment_scene

    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on a Dask worker (OMP_NUM_THREADS=1)
    try:
        out = {}
        for s in scenes:
            res = segment_scene(s, tiny_model, root / s.stem, progress=False, **SEG)
            out[s.stem] = res.outputs["classes"].parent
    finally:
        torch.set_num_threads(threads)
    return out


def _read(path: Path) -> object:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read(), ds.transform, ds.crs


def _assert_same_outputs(folder: Path, ref: Path) -> None:
    """Rasters equal pixel for pixel with the same grid; polygons equal as geometries."""
    import geopandas as gpd
    import numpy as np

    stem = ref.name
    for kind in ("classes", "confidence"):
        a, ta, ca = _read(folder / f"{stem}.{kind}.tif")  # type: ignore[misc]
        b, tb, cb = _read(ref / f"{stem}.{kind}.tif")  # type: ignore[misc]
        assert ta == tb and ca == cb
        # Bit for bit: the same tiles in the same order on the same kind of CPU.
        assert np.array_equal(a, b, equal_nan=True), f"{stem}: {kind} differ at {(a != b).sum()} pixels"
    ga = gpd.read_file(folder / f"{stem}.geojson")
    gb = gpd.read_file(ref / f"{stem}.geojson")
    assert len(ga) == len(gb) > 0
    assert ga.drop(columns="geometry").equals(gb.drop(columns="geometry"))
    assert ga.geometry.geom_equals_exact(gb.geometry, tolerance=0).all()


class _DaskProcesses:
    """A `dask scheduler` and `dask worker`s started as subprocesses on 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        import subprocess
        import sys

        self.tmp = tmp
        self.dask = str(Path(sys.executable).parent / "dask")
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scheduler = self._start(
            [
                self.dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dashboard-address",
                f"127.0.0.1:{_free_port()}",
            ],
            "scheduler",
        )
        self.workers = [self.start_worker(i) for i in range(2)]

    def _start(self, cmd: list[str], name: str) -> subprocess.Popen[bytes]:  # noqa: F821
        import subprocess

        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        # Its own session: killing the worker's process group takes its nanny and child
        # together, like a node that dies.
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        self.procs.append(p)
        return p

    def start_worker(self, i: int) -> subprocess.Popen[bytes]:  # noqa: F821
        return self._start(
            [
                self.dask,
                "worker",
                self.address,
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--name",
                f"w{i}",
                "--memory-limit",
                "4GiB",
            ],
            f"worker{i}",
        )

    def kill(self, p: subprocess.Popen[bytes]) -> None:  # noqa: F821
        import os
        import signal

        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group this fixture created
            except ProcessLookupError:
                pass
        p.wait(timeout=30)

    def replace_dead(self) -> None:
        """Start a new worker in place of each killed one (the next test wants two)."""
        for i, p in enumerate(self.workers):
            if p.poll() is not None:
                self.workers[i] = self.start_worker(i)

    def close(self) -> None:
        for p in reversed(self.procs):
            self.kill(p)


@pytest.fixture(scope="module")
def dask_processes(tmp_path_factory: pytest.TempPathFactory) -> object:
    from distributed import Client

    procs = _DaskProcesses(tmp_path_factory.mktemp("dask"))
    try:
        with Client(procs.address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
        yield procs
    finally:
        procs.close()


def test_batch_on_cluster_survives_a_killed_worker(
    dask_processes: _DaskProcesses, scenes: list[Path], tiny_model: Path, reference: dict[str, Path], tmp_path: Path
) -> None:
    from conftest import fixture_path
    from distributed import Client

    out = tmp_path / "out"
    bad_text = tmp_path / "notes.tif"
    bad_text.write_text("this is not a raster\n")
    wrong_bands = fixture_path("landsat8_parana", "rgbn.tif")  # 4 bands for a 3-band model
    missing = tmp_path / "missing.tif"
    lst = tmp_path / "scenes.txt"
    lst.write_text("\n".join(str(s) for s in scenes[2:]) + f"\n{missing}\n")

    killed: dict[str, object] = {}
    # One Client for the batch and the killer: distributed does not support two synchronous
    # clients of one process gathering through a worker's death.
    client = Client(dask_processes.address, timeout=30)

    def unfinished(keys: list) -> list[Path]:
        # A scene whose marker exists is complete even if the scheduler still lists its task
        # as processing (the marker is written just before the task returns).
        return [
            s
            for s in scenes
            if any(f"-{s.stem}-" in str(k) for k in keys) and not (out / s.stem / MARKER_NAME).exists()
        ]

    def killer() -> None:
        # Once the first scene is complete, kill a worker that is busy with an unfinished one.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any((out / s.stem / MARKER_NAME).exists() for s in scenes):
                busy = {w: ks for w, ks in client.processing().items() if unfinished(list(ks))}
                if busy:
                    addr = next(iter(busy))
                    names = {w: d["name"] for w, d in client.scheduler_info()["workers"].items()}
                    killed["address"], killed["lost"] = addr, unfinished(list(busy[addr]))
                    dask_processes.kill(dask_processes.workers[int(str(names[addr])[1:])])
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        res = batch.run_batch(
            [str(scenes[0]), str(scenes[1]), str(bad_text), str(wrong_bands)],
            tiny_model,
            out,
            scene_list=lst,
            scheduler=client,
            retries=1,
            progress=False,
            **SEG,
        )
        t.join(timeout=60)
        assert killed, "no worker was busy after the first scene finished"
        loads = batch.model_loads(client)
    finally:
        client.close()
        dask_processes.replace_dead()

    assert (res.done, res.failed, res.skipped) == (4, 3, 0)
    rows = {Path(r["scene"]).name: r for r in read_manifest(res.manifest)}
    assert "not a raster" in rows["notes.tif"]["error"]
    assert "has 4 bands" in rows["rgbn.tif"]["error"] and "expects 3" in rows["rgbn.tif"]["error"]
    assert "does not exist" in rows["missing.tif"]["error"]
    assert all("\n" not in r["error"] for r in rows.values())
    for s in scenes:
        r = rows[s.name]
        assert r["status"] == "done"
        outputs = [out / p for p in r["outputs"].split(";")]
        assert all(p.is_file() for p in outputs) and float(r["seconds"]) > 0
        assert {p.name for p in outputs} >= {f"{s.stem}.classes.tif", f"{s.stem}.geojson", f"{s.stem}.json"}
        assert check_marker(out / s.stem) is not None
        # Every output equals the single-process run, whichever worker made it.
        _assert_same_outputs(out / s.stem, reference[s.stem])
    # The scene that was unfinished on the killed worker was finished by the other one.
    lost_scenes = killed["lost"]
    assert lost_scenes and all(rows[s.name]["worker"] != killed["address"] for s in lost_scenes)  # type: ignore[attr-defined]
    # The model was read once per worker, not once per scene (one worker is left).
    assert list(loads.values()) == [1]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.csv", "catalog.json", "collection.json", *(s.stem for s in scenes)]
    )


def test_split_scene_equals_single_process(
    scenes: list[Path], tiny_model: Path, reference: dict[str, Path], tmp_path: Path
) -> None:
    """One scene spread over a LocalCluster's two workers gives the single-process outputs."""
    scene = scenes[0]  # the RGB.byte.tif window: 128 rows = 3 output blocks of 48 rows -> 2 bands
    assert len(batch.split_plan(128, SEG["tile"], SEG["overlap"], SEG["block_size"], 2)) == 2
    res = batch.run_batch([scene], tiny_model, tmp_path / "out", workers=2, split_scene=True, progress=False, **SEG)
    assert (res.done, res.failed) == (1, 0), res.rows
    folder = tmp_path / "out" / scene.stem
    _assert_same_outputs(folder, reference[scene.stem])
    got = json.loads((folder / f"{scene.stem}.json").read_text())
    ref = json.loads((reference[scene.stem] / f"{scene.stem}.json").read_text())
    assert [c["pixels"] for c in got["classes"]] == [c["pixels"] for c in ref["classes"]]
    assert len(got["split"]["bands"]) == 2
    # The band parts are gone; the folder holds exactly the single-process outputs plus the marker.
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*(p.name for p in reference[scene.stem].iterdir()), MARKER_NAME]
    )


def test_resume_skips_finished_and_redoes_partial(
    dask_processes: _DaskProcesses, scenes: list[Path], tiny_model: Path, reference: dict[str, Path], tmp_path: Path
) -> None:
    """A crash leaves a scene without marker, one with a torn output; a re-run fixes just those."""
    from distributed import Client

    with Client(dask_processes.address, timeout=60) as c:
        c.wait_for_workers(2, timeout=120)  # the killed worker's replacement has joined
    out = tmp_path / "out"
    first = scenes[:3]
    res = batch.run_batch(first, tiny_model, out, scheduler=dask_processes.address, progress=False, **SEG)
    assert (res.done, res.failed, res.skipped) == (3, 0, 0)
    kept, no_marker, torn = (out / s.stem for s in first)
    # What a crash leaves: outputs without their marker (killed before it was written), and a
    # marker whose output was rewritten halfway (same name, other bytes) plus a .part file.
    (no_marker / MARKER_NAME).unlink()
    cls = torn / f"{first[2].stem}.classes.tif"
    cls.write_bytes(cls.read_bytes()[: cls.stat().st_size // 2])
    (torn / f"{first[2].stem}.confidence.tif.part").write_bytes(b"half")
    before = {p.name: p.stat().st_mtime_ns for p in kept.iterdir()}

    res = batch.run_batch(scenes, tiny_model, out, scheduler=dask_processes.address, progress=False, **SEG)
    assert (res.done, res.failed, res.skipped) == (3, 0, 1)
    status = {Path(r["scene"]).stem: r["status"] for r in read_manifest(res.manifest)}
    assert status == {first[0].stem: "skipped", first[1].stem: "done", first[2].stem: "done", scenes[3].stem: "done"}
    assert {p.name: p.stat().st_mtime_ns for p in kept.iterdir()} == before  # untouched
    for s in scenes:
        _assert_same_outputs(out / s.stem, reference[s.stem])
        assert check_marker(out / s.stem) is not None
    _assert_stac_collection(res, out, scenes)

    # Other options make other outputs: the markers no longer vouch for them.
    res = batch.run_batch(
        first[:1], tiny_model, out, scheduler=dask_processes.address, progress=False, **{**SEG, "min_area": 1e6}
    )
    assert (res.done, res.skipped) == (1, 0)

    # A scene replaced under the same path is redone: the marker fingerprints the scene too
    # (size, modification time and its first bytes), not only the model and the options.
    import shutil

    moving = tmp_path / "incoming" / "scene.tif"
    moving.parent.mkdir()
    shutil.copyfile(scenes[0], moving)
    res = batch.run_batch([moving], tiny_model, out, scheduler=dask_processes.address, progress=False, **SEG)
    assert (res.done, res.skipped) == (1, 0)
    res = batch.run_batch([moving], tiny_model, out, scheduler=dask_processes.address, progress=False, **SEG)
    assert (res.done, res.skipped) == (0, 1)
    shutil.copyfile(scenes[3], moving)  # another scene's pixels under the same name
    res = batch.run_batch([moving], tiny_model, out, scheduler=dask_processes.address, progress=False, **SEG)
    assert (res.done, res.skipped) == (1, 0)
    with rasterio.open(moving) as src, rasterio.open(out / "scene" / "scene.classes.tif") as cls:
        assert (cls.width, cls.height, cls.transform) == (src.width, src.height, src.transform)


def _assert_stac_collection(res: batch.BatchResult, out: Path, scenes: list[Path]) -> None:
    """The batch's STAC Catalog and Collection validate (core schemas, offline) and link every
    finished scene's Item, skipped ones included; the Items themselves are not rewritten."""
    import pystac
    from test_products import _OfflineValidator

    assert res.catalog == out / "catalog.json" and res.collection == out / "collection.json"
    cat = pystac.Catalog.from_file(str(res.catalog))
    coll = pystac.Collection.from_file(str(res.collection))
    for obj in (cat, coll):
        obj.validate(validator=_OfflineValidator())
    assert [ln.href for ln in cat.links if ln.rel == "child"] == ["./collection.json"]
    hrefs = sorted(ln.href for ln in coll.links if ln.rel == "item")
    assert hrefs == sorted(f"./{s.stem}/{s.stem}.stac.json" for s in scenes)
    boxes = []
    for h in hrefs:
        item = pystac.Item.from_file(str(out / h))
        item.validate(validator=_OfflineValidator())
        assert item.get_single_link("collection") is None  # untouched: its marker's checksum holds
        boxes.append(item.bbox)
    ((w, _s, _e, n),) = coll.extent.spatial.bboxes
    assert w == min(b[0] for b in boxes) and n == max(b[3] for b in boxes)
    assert check_marker(out / scenes[0].stem) is not None


def test_a_batch_onto_a_full_disk_records_one_line_and_leaves_no_folder(
    scenes: list[Path], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during the COG copies (GDAL's CPLE_AppDefinedError) put a raw
    `TIFFAppendToStrip` error in the manifest; now the row holds the one-line disk-full
    error and the scene's folder is not left behind. Threads of this process are the
    workers, so the disk can be filled by monkeypatching."""
    from distributed import Client, LocalCluster
    from rasterio._err import CPLE_AppDefinedError

    import geovae.atomic
    import geovae.sinks.rasters

    def full(*a: object, **k: object) -> None:
        raise CPLE_AppDefinedError(1, 1, "TIFFAppendToStrip:Write error at scanline 0")

    monkeypatch.setattr(geovae.sinks.rasters, "write_cog", full)
    monkeypatch.setattr(geovae.atomic, "_free", lambda folder: 4096)
    out = tmp_path / "out"
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        res = batch.run_batch([scenes[0]], tiny_model, out, scheduler=client, progress=False, retries=0, **SEG)
    (row,) = res.rows
    assert res.failed == 1 and row.error.startswith("no space left on the device of "), row.error
    assert "\n" not in row.error and "TIFF" not in row.error
    assert sorted(p.name for p in out.iterdir()) == [batch.MANIFEST_NAME]


def _starting_workers(pid: int) -> list[int]:
    """The worker processes of ``pid`` (multiprocessing's spawn) that have Python's Ctrl-C
    handler: started, and their preload not run yet."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if b"spawn_main" not in Path(f"/proc/{child}/cmdline").read_bytes():
                    continue
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            caught = next(int(ln.split()[1], 16) for ln in status.splitlines() if ln.startswith("SigCgt:"))
            if caught & (1 << (2 - 1)):  # SIGINT
                kids.append(int(child))
    return kids


@pytest.mark.parametrize(
    ("signame", "to_group", "when"),
    [
        ("SIGTERM", False, "running"),
        ("SIGINT", True, "running"),
        ("SIGINT", True, "starting"),
        ("SIGTERM", False, "split"),
    ],
)
def test_a_stopped_batch_is_one_line(
    scenes: list[Path], tiny_model: Path, tmp_path: Path, signame: str, to_group: bool, when: str
) -> None:
    """SIGTERM to `geovae batch` printed 37 lines (a dask heartbeat traceback, worker
    warnings); Ctrl-C in a terminal, which reaches every process of the batch, printed a
    KeyboardInterrupt traceback from each worker process (70 lines with two), and while the
    workers were starting ended "cannot start a local Dask cluster" (exit 1). Each stops
    with exit 143/130 and one line. The killed workers' staging folders (and a split
    scene's band rasters) stayed in the scene's folder until the next run; now the batch
    clears them as it stops."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if when == "starting" and not Path("/proc/self/task").is_dir():
        pytest.skip("finding the worker processes as they start needs /proc")
    signum = getattr(signal, signame)
    out = tmp_path / "out"
    scene = scenes[0]
    if when != "starting":  # a scene the worker is still segmenting when the signal comes
        scene = tmp_path / "big.tif"
        with rasterio.open(scenes[0]) as src:
            data, prof = np.tile(src.read(), (1, 6, 6)), src.profile
        with rasterio.open(scene, "w", **(prof | {"width": data.shape[2], "height": data.shape[1]})) as dst:
            dst.write(data)
    cmd = [sys.executable, "-m", "geovae", "-q", "batch", str(scene), "-m", str(tiny_model), "-o", str(out)]
    cmd += ["--workers", "1", "--tile", "16", "--overlap", "4", "--batch-size", "1", "--samples", "8", "--force"]
    if when == "split":
        cmd.append("--split-scene")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=to_group
    )
    deadline = time.time() + 120
    if when == "starting":  # a worker runs Python, its preload has not run yet
        while time.time() < deadline and not _starting_workers(proc.pid) and proc.poll() is None:
            time.sleep(0.005)
        assert _starting_workers(proc.pid) and not (out / batch.MANIFEST_NAME).exists(), proc.communicate()
    else:  # the scene is running on the worker: it has staged something
        staged = ".split-*" if when == "split" else ".*.geovae-run-*.part"
        while time.time() < deadline and not list(out.glob(f"*/{staged}")) and proc.poll() is None:
            time.sleep(0.05)
        assert list(out.glob(f"*/{staged}")), proc.communicate()
    if to_group:
        os.killpg(proc.pid, signum)  # what a terminal's Ctrl-C does
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    said = "geovae: terminated" if signum == signal.SIGTERM else "geovae: interrupted"
    assert proc.returncode == (143 if signum == signal.SIGTERM else 130) and err.strip() == said, err
    if out.exists():
        names = sorted(p.name for p in out.iterdir())
        if when == "starting" and names != [batch.MANIFEST_NAME]:
            # On a busy machine the small scene can be done before the signal stops its worker
            # (a worker ignores Ctrl-C; the cluster's shutdown stops it): then it is a whole,
            # committed set, its report written last, and nothing of the run is left beside it.
            from geovae.products import output_name

            folder = out / scene.stem
            assert names == sorted([batch.MANIFEST_NAME, scene.stem]), names
            assert (folder / output_name(scene.stem, "report")).is_file(), list(folder.iterdir())
            assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], list(folder.iterdir())
        else:
            assert names == [batch.MANIFEST_NAME], list(out.rglob("*"))
