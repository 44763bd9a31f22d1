"""Peak memory of ``geovae segment`` with the default VAE and the default options, by scene
size, and what holds it (issue 29).

The model is the default VAE (the architecture ``geovae train`` builds) trained by ``geovae
train`` for one epoch on the real Landsat-8 Parana scene (2041 x 1860 x 3 uint16) against three
brightness classes of the scene itself (terciles of the mean of B2-B4; fill pixels unlabelled).
It is cached in ``$GEOVAE_BENCH_CACHE`` (default ``/tmp/geovae-bench-cache``), keyed by the
default architecture.

The scenes are VRT mosaics of the Parana scene on an N x N grid, written in a temporary folder:
1 is the scene itself (3.8 MP), 2 is 4082 x 3720 (15 MP), 4 is 8164 x 7440 (61 MP), 8 is
16328 x 14880 (243 MP); ``--wide W`` adds a W x 2048 strip. Each scene runs ``geovae segment
SCENE -m MODEL -o OUT --nodata 0`` (every other option at its default: automatic tile and
batch, GeoJSON polygons, quicklook; the file has fill 0 without a nodata tag) in a subprocess
of its own: the CLI's ``main`` called in a Python process that first starts a sampling thread.
The parent samples the RSS of the child's whole process tree from ``/proc`` every 0.1 s
(``tree_peak``: the largest sum, or any one process's ``VmHWM`` if larger, which keeps a peak
shorter than the sampling interval); the child reports its own high-water mark too.

The sampling thread records every 0.2 s what the parts that could grow with the scene hold:

* ``blender``: the blender's accumulator, right strip and row of bottom strips (MiB);
* ``open_pieces`` / ``open_vertices``: the polygon pieces held open between rows of blocks
  (:class:`geovae.vector.OpenState`) and their vertices (16 bytes each as coordinates);
* ``poly_queue``: blocks waiting for the polygon worker; ``writer_queue``: Arrow batches
  waiting for the format writers;
* ``gdal_cache``: GDAL's raster block cache (``GDALGetCacheUsed64`` of rasterio's GDAL, MiB);
* ``trust_sample``: the trust check's sparse sample of the scene (MiB);
* ``heap_free``: memory glibc's malloc holds but has freed (``mallinfo2().fordblks``, MiB);
* ``heap_used``: memory allocated through malloc and alive (``uordblks + hblkhd``, MiB): NumPy,
  torch, GDAL and GEOS alike;
* with ``--tracemalloc``, ``traced``: what Python and NumPy hold (``tracemalloc``, MiB; torch's
  tensors and GDAL's buffers are not traced, so RSS minus this is theirs);
* the stage the run is in (from its log lines).

It also measures, in another subprocess, the model's activations for one batch at the run's
tile and batch size (the high-water mark of ``predict`` above the RSS before it).

It prints, for each scene, the peak RSS of the tree and its ratio to the first scene's, the RSS
after imports and the model, the activations, each part's maximum and the peak per stage; then
the ratio of the largest scene's peak to the smallest's.

Usage::

    .venv/bin/python benchmarks/bench_vae_memory.py --quick          # 1 and 2 copies: a check
    .venv/bin/python benchmarks/bench_vae_memory.py                  # 1, 4 and 8 copies
    .venv/bin/python benchmarks/bench_vae_memory.py --copies 1,4 --wide 100096 --json out.json

Memory figures are steadier than times on a shared machine, but a busy one still moves them
(page cache pressure, other processes): record numbers from a quiet machine.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

MIB = 2**20
#: The parts sampled, in the order printed.
PARTS = (
    "blender",
    "open_pieces",
    "open_vertices",
    "poly_queue",
    "writer_queue",
    "gdal_cache",
    "trust_sample",
    "heap_free",
    "heap_used",
    "traced",
)
#: The three classes the model is trained on.
CLASSES = "1:dark,2:mid,3:bright"


# -- /proc -----------------------------------------------------------------------------------


def _status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB (empty when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _children() -> dict[int, list[int]]:
    """Every process's children, from ``/proc/*/stat``."""
    kids: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                text = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(stat.split("/")[2]))
    return kids


def tree_rss_mib(pid: int) -> tuple[float, float]:
    """RSS of ``pid`` and all its descendants together, and the largest high-water mark
    (``VmHWM``) among them, in MiB: the sum is sampled, so it can miss a short peak that
    the high-water mark keeps."""
    kids = _children()
    todo, total, hwm = [pid], 0, 0
    while todo:
        p = todo.pop()
        st = _status(p)
        total += st.get("VmRSS", 0)
        hwm = max(hwm, st.get("VmHWM", 0))
        todo.extend(kids.get(p, []))
    return total / 1024, hwm / 1024


# -- the child: one `geovae segment` run under a watch -----------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def _gdal_cache_used() -> Any:
    """``GDALGetCacheUsed64`` of the GDAL rasterio loaded (its wheel's own copy, else the system's)."""
    import rasterio

    libs = sorted(glob.glob(str(Path(rasterio.__file__).parent.parent / "rasterio.libs" / "libgdal*")))
    lib = ctypes.CDLL(libs[0] if libs else "libgdal.so")
    lib.GDALGetCacheUsed64.restype = ctypes.c_int64
    return lib.GDALGetCacheUsed64


class Watch:
    """Samples RSS and the parts' sizes from a thread; finds the blender, the polygon stream,
    the format writers and the trust sample by wrapping what makes them (the run does not
    hand them out)."""

    def __init__(self, every: float = 0.2, traced: bool = False):
        import geovae.blend as blend
        import geovae.segment.trust as trust
        import geovae.vector.formats as formats
        import geovae.vector.stream as stream

        self.every = every
        self.traced = traced
        self.samples: list[dict[str, Any]] = []
        self.stage = "reading the scene, loading the model"
        self.blender: Any = None
        self.stream: Any = None
        self.writers: list[Any] = []
        self.trust_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _MallInfo2
        self._gdal = _gdal_cache_used()
        for cls, attr in ((blend.Blender, "blender"), (stream.PolygonStream, "stream"), (formats.FormatWriters, None)):
            self._wrap(cls, attr)
        sample = trust.scene_sample
        watch = self

        def scene_sample(scene: Any) -> Any:
            x = sample(scene)
            watch.trust_bytes = max(watch.trust_bytes, x.nbytes)
            return x

        trust.scene_sample = scene_sample  # type: ignore[assignment]

        class _Stage(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                # Each log line closes a stage: what follows is the next one.
                msg = record.getMessage()
                for key, stage in (
                    ("predicted and blended", "closing the rasters (COGs, overviews)"),
                    ("rasters closed", "closing the polygons"),
                    ("polygons written", "quicklook"),
                    ("quicklook drawn", "report and STAC item"),
                ):
                    if key in msg:
                        watch.stage = stage

        # The CLI leaves geovae's loggers at WARNING; this one is set apart so that the stage
        # lines reach the handler, and kept from the console.
        log = logging.getLogger("geovae.segment")
        log.setLevel(logging.INFO)
        log.propagate = False
        log.addHandler(_Stage())

    def _wrap(self, cls: Any, attr: str | None) -> None:
        init = cls.__init__
        watch = self

        def wrapped(obj: Any, *a: Any, **k: Any) -> None:
            init(obj, *a, **k)
            if attr is None:
                watch.writers.append(obj)
            else:
                setattr(watch, attr, obj)
                if attr == "blender":
                    watch.stage = "reading and predicting"

        cls.__init__ = wrapped

    def _sample(self) -> dict[str, Any]:
        import tracemalloc

        b, s = self.blender, self.stream
        mi = self._libc.mallinfo2()
        return {
            "stage": self.stage,
            "rss": _status()["VmRSS"] / 1024,
            "blender": (b.buffer_bytes if b is not None else 0) / MIB,
            "open_pieces": s.open_state.pieces if s is not None else 0,
            "open_vertices": s.open_state.coordinates if s is not None else 0,
            "poly_queue": s._queue.qsize() if s is not None else 0,
            "writer_queue": sum(q.qsize() for w in self.writers for q in w.queues),
            "gdal_cache": self._gdal() / MIB,
            "trust_sample": self.trust_bytes / MIB,
            "heap_free": mi.fordblks / MIB,
            "heap_used": (mi.uordblks + mi.hblkhd) / MIB,
            "traced": tracemalloc.get_traced_memory()[0] / MIB if self.traced else 0.0,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(self._sample())

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._sample())


def child(scene: Path, model: Path, out: Path, traced: bool) -> dict[str, Any]:
    """One ``geovae segment`` run with the default options under a :class:`Watch`; its record."""
    from geovae.cli import main

    if traced:
        import tracemalloc

        tracemalloc.start()
    watch = Watch(traced=traced)
    before = _status()["VmRSS"] / 1024
    t0 = time.perf_counter()
    with watch:
        code = main(["segment", str(scene), "-m", str(model), "-o", str(out), "--nodata", "0"])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"geovae segment exited {code}")
    (rep,) = (d for d in (json.loads(p.read_text()) for p in out.glob("*.json")) if "options" in d and "tiles" in d)
    peak = max(watch.samples, key=lambda s: s["rss"])
    stages: dict[str, float] = {}
    for s in watch.samples:
        stages[s["stage"]] = max(stages.get(s["stage"], 0.0), s["rss"])
    return {
        "scene": scene.name,
        "width": rep["scene"]["width"],
        "height": rep["scene"]["height"],
        "megapixels": rep["scene"]["width"] * rep["scene"]["height"] / 1e6,
        "seconds": seconds,
        "rss_before_mib": before,
        "peak_rss_mib": _status()["VmHWM"] / 1024,
        "peak_sample": peak,
        "parts_max": {k: max(s[k] for s in watch.samples) for k in PARTS},
        "stage_peaks": stages,
        "options": {k: rep["options"][k] for k in ("tile", "overlap", "batch_size", "block_size")},
        "tiles": rep["tiles"],
    }


def activations(model: Path, tile: int, batch: int) -> float:
    """MiB the model's forward pass takes above the RSS before it, for one batch of ``tile``² tiles."""
    import torch

    from geovae.model.io import load_model

    m = load_model(model, "cpu")
    x = torch.rand(batch, m.info.in_channels, tile, tile) * 4000 + 7000
    before = _status()["VmRSS"]
    m.predict(x)
    return (_status()["VmHWM"] - before) / 1024


# -- the parent ------------------------------------------------------------------------------


def trained_model(cache: Path) -> Path:
    """The default VAE after one epoch of ``geovae train`` on Parana's three brightness classes
    (trained once, then reused from ``cache``)."""
    import numpy as np
    import rasterio

    from geovae.training.task import default_architecture  # torch and Lightning: only here

    key = hashlib.sha1(json.dumps([default_architecture(), CLASSES, "epochs=1"], default=str).encode()).hexdigest()
    path = cache / f"parana_default_vae_1epoch_{key[:10]}.safetensors"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    labels = cache / "parana_brightness_classes.tif"
    with rasterio.open(common.PARANA) as src:
        bands = src.read().astype(np.float32)
        profile = src.profile
    valid = bands[0] > 0
    bright = bands.mean(axis=0)
    lab = (1 + np.digitize(bright, np.quantile(bright[valid], [1 / 3, 2 / 3]))).astype(np.uint8)
    lab[~valid] = 0
    profile.update(count=1, dtype="uint8", nodata=0, compress="deflate")
    with rasterio.open(labels, "w", **profile) as dst:
        dst.write(lab, 1)
    tmp = path.with_name(path.name + ".part.safetensors")
    cmd = [str(Path(sys.executable).with_name("geovae")), "train", "--image", str(common.PARANA)]
    cmd += ["--labels", str(labels), "--classes", CLASSES, "--epochs", "1", "-o", str(tmp)]
    print("training the default VAE for one epoch (once; cached):", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=cache)
    os.replace(tmp, path)
    return path


def run_watched(cmd: list[str], every: float = 0.1) -> tuple[dict[str, Any], float]:
    """Run a child whose last stdout line is JSON; return it and the peak RSS (MiB) of the
    child's process tree: the largest sum of its processes' RSS, sampled every ``every``
    seconds, or any one process's high-water mark if larger."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, text=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, *tree_rss_mib(proc.pid))
            time.sleep(every)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"child failed (exit {proc.returncode}):\n{tail}")
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--copies", default="1,4,8", help="mosaics of N x N copies of the scene, comma-separated")
    ap.add_argument("--quick", action="store_true", help="only 1 and 2 copies: to check the script")
    ap.add_argument("--wide", type=int, help="also a WIDE x 2048 strip")
    ap.add_argument("--model", type=Path, help="a model file instead of the default VAE trained here")
    ap.add_argument("--tracemalloc", action="store_true", help="also trace Python and NumPy allocations")
    ap.add_argument("--workdir", default=None, help="folder for the temporary scenes and outputs")
    ap.add_argument("--json", help="also write the records to this file")
    ap.add_argument("--child", nargs=3, metavar=("SCENE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--activations", nargs=3, metavar=("MODEL", "TILE", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        scene, model, out = (Path(p) for p in a.child)
        print(json.dumps(child(scene, model, out, a.tracemalloc)))
        return
    if a.activations:
        print(json.dumps({"activations_mib": activations(Path(a.activations[0]), *map(int, a.activations[1:]))}))
        return
    common.require_data()
    model = a.model or trained_model(common.CACHE)
    copies = [1, 2] if a.quick else [int(n) for n in a.copies.split(",")]
    print(f"model {model}; {common.machine_info().get('cpu', '')}", flush=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="geovae-vae-memory-", dir=a.workdir) as tmp:
        w, h = _scene_size()
        scenes = [common.PARANA if n == 1 else common.mosaic_vrt(h * n, Path(tmp), width=w * n) for n in copies]
        if a.wide:
            scenes.append(common.mosaic_vrt(2048, Path(tmp), width=a.wide))
        for i, scene in enumerate(scenes):
            cmd = [sys.executable, __file__, "--child", str(scene), str(model), str(Path(tmp) / f"out{i}")]
            rec, tree_peak = run_watched(cmd + (["--tracemalloc"] if a.tracemalloc else []))
            rec["tree_peak_mib"] = max(tree_peak, rec["peak_rss_mib"])
            o = rec["options"]
            act, _ = run_watched(
                [sys.executable, __file__, "--activations", str(model), str(o["tile"]), str(o["batch_size"])]
            )
            rec.update(act)
            records.append(rec)
            _print(rec, records[0])
    small, large = min(records, key=lambda r: r["megapixels"]), max(records, key=lambda r: r["megapixels"])
    print(
        f"peak RSS of the process tree, largest / smallest scene ({large['megapixels']:.1f} / "
        f"{small['megapixels']:.1f} MP): x{large['tree_peak_mib'] / small['tree_peak_mib']:.2f} "
        f"({small['tree_peak_mib']:.0f} -> {large['tree_peak_mib']:.0f} MiB)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": common.machine_info(), "records": records}, indent=2))


def _scene_size() -> tuple[int, int]:
    """The Parana scene's width and height."""
    import rasterio

    with rasterio.open(common.PARANA) as src:
        return src.width, src.height


def _print(rec: dict[str, Any], first: dict[str, Any]) -> None:
    p, o = rec["parts_max"], rec["options"]
    traced = f", Python + NumPy traced {p['traced']:.0f} MiB" if p["traced"] else ""
    print(
        f"{rec['width']:>6} x {rec['height']:<6} {rec['megapixels']:6.1f} MP  peak RSS {rec['tree_peak_mib']:5.0f} MiB "
        f"(process tree; x{rec['tree_peak_mib'] / first['tree_peak_mib']:.2f} of the first; VmHWM "
        f"{rec['peak_rss_mib']:.0f} MiB) at '{rec['peak_sample']['stage']}', {rec['seconds']:.0f} s\n"
        f"    imports + model {rec['rss_before_mib']:.0f} MiB; tile {o['tile']}, overlap {o['overlap']}, batch "
        f"{o['batch_size']}, block {o['block_size']}; activations of one batch {rec['activations_mib']:.0f} MiB\n"
        f"    maxima: blender {p['blender']:.0f} MiB, open polygons {p['open_pieces']} pieces / "
        f"{p['open_vertices']} vertices ({p['open_vertices'] * 16 / MIB:.1f} MiB as coordinates), "
        f"blocks queued {p['poly_queue']}, batches queued {p['writer_queue']}, GDAL cache {p['gdal_cache']:.0f} MiB, "
        f"trust sample {p['trust_sample']:.1f} MiB, malloc in use {p['heap_used']:.0f} MiB and free "
        f"{p['heap_free']:.0f} MiB{traced}\n"
        f"    peak RSS by stage: {', '.join(f'{k} {v:.0f} MiB' for k, v in rec['stage_peaks'].items())}",
        flush=True,
    )


if __name__ == "__main__":
    main()
