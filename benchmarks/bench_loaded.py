"""geovae with a TorchGeo checkpoint against the TorchGeo loop, on a quiet CPU and beside busy processes.

What it measures: whether geovae's helper threads (readers, the polygon worker, the format
writers; :mod:`geovae.cpu`) hold its model back on a CPU that other work keeps busy. The
three workers of ``benchmarks/bench_torchgeo.py`` (geovae end to end, the TorchGeo loop end to
end, the model alone on geovae's tiles) run on a Parana mosaic with the ``fcn`` section's
TorchGeo FCN checkpoint (exported with the scene's band statistics), tile 512, overlap 64,
batch 8, the same torch thread count on every side, in two conditions:

``quiet``
    nothing else started;
``loaded``
    one CPU-bound process per core (``python -c "while True: pass"``, ``--load-procs``)
    started before the worker and stopped after it.

Printed per condition (medians of per-repeat ratios; a repeat holds one run of each worker
close together in time): geovae's throughput over the loop's (``>= 1.0``: never behind the
naive loop) and geovae's time over the loop's own model-only time, the seconds inside its
forward passes (``<= 1.10`` is issue 28's target). Workers and conditions are interleaved
(A B C, C B A; quiet loaded, loaded quiet) so that drift hits every side alike.

Usage::

    .venv/bin/python -m benchmarks.bench_loaded                 # 61-MP mosaic (7808^2), 2 repeats
    .venv/bin/python -m benchmarks.bench_loaded --quick         # smoke run: 1024^2, 1 repeat
    .venv/bin/python -m benchmarks.bench_loaded --helper-nice 0 # the helpers at the model's priority
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import bench_speed, common
from benchmarks.common import median, run_json

METHODS = ("geovae", "torchgeo", "model")
CONDITIONS = ("quiet", "loaded")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BusyProcesses:
    """``n`` CPU-bound Python processes for the duration of a ``with`` block (none for n = 0)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> BusyProcesses:
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.5 if self.n else 0)  # every one running before the measurement starts
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def _cmd(method: str, scene: Path, model: Path, out: Path, a: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.bench_torchgeo", "--worker", method, str(scene), str(model), str(out)]
    cmd += ["--tile", "512", "--overlap", "64", "--batch-size", "8", "--threads", str(a.threads)]
    if a.helper_nice is not None:
        cmd += ["--helper-nice", str(a.helper_nice)]
    return cmd


def compare(a: argparse.Namespace) -> dict[str, Any]:
    scene = common.mosaic_vrt(a.size)
    model = bench_speed.torchgeo_fcn()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {m: [] for m in METHODS} for c in CONDITIONS}
    _log(f"{scene.name}, {model.name}, threads {a.threads}, {a.load_procs} busy processes when loaded")
    with tempfile.TemporaryDirectory(prefix="geovae-bench-loaded-") as tmp:
        for r in range(a.repeats):
            for cond in CONDITIONS if r % 2 == 0 else tuple(reversed(CONDITIONS)):
                for i, method in enumerate(METHODS if r % 2 == 0 else tuple(reversed(METHODS))):
                    out = Path(tmp) / f"{cond}_{method}_{r}_{i}"
                    with BusyProcesses(a.load_procs if cond == "loaded" else 0):
                        rec = run_json(_cmd(method, scene, model, out, a), timeout=a.worker_timeout)
                    shutil.rmtree(out, ignore_errors=True)
                    runs[cond][method].append(rec)
                    _log(f"  {cond:6s} {method:8s} {rec['seconds']:7.1f} s  CPU {rec['cpu_s']:6.1f} s")
    res: dict[str, Any] = {"scene": scene.name, "size": a.size, "model": model.name, "threads": a.threads}
    res["load_procs"], res["helper_nice"] = a.load_procs, a.helper_nice
    for cond, rs in runs.items():
        g, t, m = rs["geovae"], rs["torchgeo"], rs["model"]
        res[cond] = {
            "seconds": {k: median([x["seconds"] for x in v]) for k, v in rs.items()},
            "loop_model_s": median([x["timings_s"]["model_s"] for x in t]),
            "throughput_ratio": median([tt["seconds"] / gg["seconds"] for gg, tt in zip(g, t)]),
            "time_over_loop_model": median([gg["seconds"] / tt["timings_s"]["model_s"] for gg, tt in zip(g, t)]),
            "time_over_model_only": median([gg["seconds"] / mm["seconds"] for gg, mm in zip(g, m)]),
        }
    res["runs"] = runs
    return res


def print_summary(res: dict[str, Any]) -> None:
    nice = "geovae's default" if res["helper_nice"] is None else str(res["helper_nice"])
    print(
        f"\n{res['scene']}, {res['model']}, {res['threads']} torch threads, helper nice {nice}; "
        f"loaded = {res['load_procs']} busy processes; medians of per-repeat ratios"
    )
    print(
        f"  {'condition':9s} {'geovae':>8s} {'loop':>8s} {'loop model':>11s} {'throughput':>11s} {'time/loop model':>16s}"
    )
    for cond in CONDITIONS:
        d = res[cond]
        s = d["seconds"]
        print(
            f"  {cond:9s} {s['geovae']:7.1f}s {s['torchgeo']:7.1f}s {d['loop_model_s']:10.1f}s "
            f"{'x':>5s}{d['throughput_ratio']:5.2f} {'x':>10s}{d['time_over_loop_model']:5.2f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_loaded",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", type=int, help="side of the Parana mosaic (default 7808, 61 MP; quick 1024)")
    p.add_argument("--repeats", type=int, help="repeats of each condition (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on every side")
    p.add_argument("--load-procs", type=int, default=os.cpu_count() or 1, help="busy processes when loaded")
    p.add_argument("--helper-nice", type=int, help="geovae's helper threads' nice increment [default: geovae's]")
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--worker-timeout", type=float, default=1800.0)
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args()
    a.size = a.size or (1024 if a.quick else 7808)
    a.repeats = a.repeats or (1 if a.quick else 2)
    res = {"machine": common.machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **compare(a)}
    print_summary(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
