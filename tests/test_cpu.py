"""The helper threads keep off the model's cores: their counts follow the cores other work
leaves free, and each runs at a lower priority than the model's threads (geovae.cpu)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import geovae.cpu
import geovae.segment.reader
from geovae.cpu import HELPER_NICE, free_cores, helper_threads, lower_priority, others_load, thread_nice
from geovae.model.base import ModelInfo, SegmentationModel
from geovae.scene import open_scene
from geovae.segment import segment_scene
from geovae.segment.reader import Reader
from geovae.sinks.rasters import cog_threads

linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="threads have their own nice value on Linux only"
)


def test_free_cores_and_helper_threads_under_a_given_load() -> None:
    assert free_cores(cores=2, load=0.0) == 2
    assert free_cores(cores=2, load=1.2) == 1
    assert free_cores(cores=2, load=2.0) == 0
    assert free_cores(cores=2, load=5.0) == 0
    assert helper_threads(4, cores=8, load=0.0) == 4
    assert helper_threads(4, cores=8, load=6.0) == 2
    assert helper_threads(4, cores=2, load=2.0) == 1  # never none: the work must still be done


@linux
def test_others_load_counts_this_process_out() -> None:
    """others_load subtracts this process's runnable threads: a spinning thread of ours is
    always runnable, so it is counted as this process's own."""
    import glob

    from geovae.cpu import _running_threads

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        # this thread (reading) and the spinning one
        assert _running_threads(glob.glob("/proc/self/task/*/stat")) >= 2
        assert others_load() >= 0
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize(("load", "workers"), [(0.0, 4), (6.0, 2), (8.0, 1), (20.0, 1)])
def test_reader_threads_follow_the_free_cores(
    monkeypatch: pytest.MonkeyPatch, nc_stack: Path, load: float, workers: int
) -> None:
    monkeypatch.setattr(geovae.cpu, "others_load", lambda: load)
    monkeypatch.setattr(geovae.cpu, "available_cores", lambda: 8)
    monkeypatch.setattr(geovae.segment.reader, "available_cores", lambda: 8)
    sc = open_scene(nc_stack)
    try:
        assert Reader(sc, [], 1, np.zeros(sc.count), pin=False).workers == workers
    finally:
        sc.close()


def test_cog_threads_follow_the_free_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GDAL_NUM_THREADS", raising=False)
    monkeypatch.setattr(geovae.cpu, "available_cores", lambda: 2)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(geovae.cpu, "others_load", lambda: 0.0)
        assert cog_threads() == 2
        monkeypatch.setattr(geovae.cpu, "others_load", lambda: 2.0)  # a busy process per core
        assert cog_threads() == 1
    finally:
        torch.set_num_threads(n)


@linux
def test_lower_priority_is_relative_to_the_main_thread() -> None:
    import os

    main_nice = os.getpriority(os.PRIO_PROCESS, os.getpid())
    seen: list[int | None] = []

    def helper() -> None:
        seen.append(lower_priority())
        seen.append(lower_priority())  # again, or in a thread it starts: no further change

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    assert seen == [min(19, main_nice + HELPER_NICE)] * 2
    assert os.getpriority(os.PRIO_PROCESS, os.getpid()) == main_nice


class _Recording(SegmentationModel):
    """A small convolutional model that notes, at every batch, the nice value of every thread."""

    seen: dict[str, int | None]

    def predict(self, x: Any, samples: int = 0, reconstruction: bool = False) -> dict[str, Any]:
        for t in threading.enumerate():
            if t.name.startswith("geovae-") or t is threading.main_thread():
                self.seen[t.name] = thread_nice(t)
        return super().predict(x, samples=samples, reconstruction=reconstruction)


@linux
def test_helper_threads_run_at_lower_priority_during_a_run(
    monkeypatch: pytest.MonkeyPatch, nc_stack: Path, tmp_path: Path
) -> None:
    """Readers (a pool of 2 here), the polygon worker and the format writers run at the main
    thread's nice value + HELPER_NICE while the model computes; the model's thread does not."""
    monkeypatch.setattr(geovae.cpu, "others_load", lambda: 0.0)
    monkeypatch.setattr(geovae.cpu, "available_cores", lambda: 4)
    monkeypatch.setattr(geovae.segment.reader, "available_cores", lambda: 4)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    model = _Recording(net, ModelInfo(in_channels=6, num_classes=3, mean=[80.0] * 6, std=[30.0] * 6, halo=4), "cpu")
    model.seen = {}
    segment_scene(
        nc_stack, model, tmp_path / "out", tile=64, overlap=16, batch_size=1, block_size=64,
        formats=("gpkg", "parquet"), quicklook=False, progress=False, device="cpu",
    )  # fmt: skip
    seen = model.seen
    main = seen.pop("MainThread")
    assert main is not None
    helpers = seen
    names = {n.rstrip("_0123456789") for n in helpers}
    assert {"geovae-reader", "geovae-read", "geovae-polygons", "geovae-polygon-writer"} <= names, helpers
    assert set(helpers.values()) == {min(19, main + HELPER_NICE)}, helpers
