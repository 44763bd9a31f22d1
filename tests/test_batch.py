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

import pytest

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
from geovae.errors import ClusterError, OptionError, OutputError

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
        SceneRow("s1.tif", "s1", "done", "", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:02+00:00", 2.0,
                 "tcp://w", ["s1/s1.classes.tif", "s1/s1.geojson"]),
        SceneRow("s2.tif", "s2", "failed", "s2.tif: no such file, check the path, \"quoted\""),
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


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "out.txt"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        batch.run_batch([str(tmp_path / "s.tif")], tmp_path / "m", f, progress=False)


def test_no_scenes_is_an_option_error(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="no scenes"):
        batch.run_batch([], tmp_path / "m", tmp_path / "out", progress=False)
