"""Run every geovae benchmark, print one table and write it as JSON.

Usage::

    .venv/bin/python -m benchmarks                       # full run, about 1 h on 2 CPU cores
    .venv/bin/python -m benchmarks --quick               # smoke run, about 15 minutes
    .venv/bin/python -m benchmarks --only fcn,tiling,vaespeed,vaememory
    .venv/bin/python -m benchmarks --sizes 2048,8192,20480 --json results.json

Sections (``--only`` names; docs/benchmarks.md has one section per benchmark, named as here):

- ``e2e``, *Speed against the TorchGeo loop*: scene to polygons, geovae vs the TorchGeo loop
  (``bench_torchgeo``), same model file, tile, overlap, batch size and torch thread count, and
  geovae's end-to-end time over the model's forward time on the same tiles already in
  memory; runs interleaved.
- ``memory``, *Memory against scene size*: peak RSS against scene size (VRT mosaics of the
  real Landsat-8 scene), geovae and the TorchGeo loop, with a stand-in model (see
  ``common.StandInSegmenter``).
- ``memscript``, *Pipeline memory script*: ``bench_memory.py`` with its 1x1-convolution model.
- ``vectorize``, *Vectorising*: ``bench_vectorize.py`` (geovae's vectoriser vs whole-array shapes).
- ``distributed``, *Distributed batch*: ``bench_distributed.py`` (1 vs 2 workers), when present.
- ``fcn``, *A TorchGeo checkpoint end to end*: ``e2e`` again on a TorchGeo
  FCN checkpoint (exported with the scene's band statistics), a 61-MP mosaic, tile 512,
  overlap 64, batch 8 (pieces in ``bench_speed.py``, as for the three below).
- ``tiling``, *Seams: tiled against untiled*: the default VAE on a real 1024^2 crop, untiled,
  with its defaults, at tile 320 with the default overlap, and at the user choices 256/64 and
  128/32; class agreement.
- ``vaespeed``, *Default VAE speed*: the default VAE with geovae's default tile, overlap and
  batch against a baseline VAE (base 32, depth 4, tile 256, overlap 64, batch 8),
  interleaved.
- ``vaememory``, *Memory by scene shape*: peak RSS of the default VAE at 2048^2 and
  20480 x 2048, and of the stand-in on a 100,096 x 1024 scene.
- ``onnx``, *ONNX Runtime against PyTorch*: ``bench_onnx.py`` (the default VAE end to end on
  a 3 x 3 NC mosaic, torch and onnxruntime backends, interleaved).
- ``loaded``, *Beside busy processes*: ``bench_loaded.py`` (geovae with a TorchGeo checkpoint
  against the TorchGeo loop, quiet and with a CPU-bound process per core).

Every measurement is a subprocess of its own (peak RSS is its own); ratios come from runs
interleaved within this invocation. Nothing is written into the repository except the JSON
file asked for with ``--json``; scenes and outputs live in a temporary/cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import bench_speed, common
from benchmarks.common import interleaved, median, run_json

HERE = Path(__file__).resolve().parent
#: Largest scene the TorchGeo loop runs in the memory section: its full-scene accumulators
#: (K + 1 float32 per pixel) would need about 11 GiB at 20k x 20k.
BASELINE_MAX = 8192
#: Largest size handed to bench_memory.py: the memory section covers the larger ones, and the full run
#: must stay near 20 minutes on 2 cores.
MEMORY_SCRIPT_MAX = 2048
GB = 1e9  # the memory targets' "3 GB" is decimal


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _worker_cmd(method: str, scene: Path, model: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.bench_torchgeo",
        "--worker",
        method,
        str(scene),
        str(model),
        str(out),
        "--tile",
        str(a.tile),
        "--overlap",
        str(a.overlap),
        "--batch-size",
        str(a.batch_size),
        "--threads",
        str(a.threads),
    ]


def _run_worker(method: str, scene: Path, model: Path, work: Path, a: argparse.Namespace, tag: str) -> dict[str, Any]:
    out = work / f"{tag}_{method}"
    try:
        rec = run_json(_worker_cmd(method, scene, model, out, a), timeout=a.worker_timeout)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # outputs of a 20k scene are large
    _log(f"  {tag} {method:8s} {rec['seconds']:8.1f} s  peak RSS {rec['peak_rss_mib']:7.0f} MiB")
    return rec


# -- e2e: speed against the TorchGeo loop ------------------------------------------------------


def end_to_end(
    a: argparse.Namespace,
    work: Path,
    *,
    model: Path | None = None,
    size: int | None = None,
    tag: str = "e2e",
    note: str | None = None,
) -> dict[str, Any]:
    """geovae, the TorchGeo loop and the model alone, interleaved, on one scene.

    ``a`` carries tile, overlap, batch size and threads (the same on every side)."""
    size = size or a.e2e_size
    scene = common.mosaic_vrt(size)
    model = model or common.benchmark_model()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in ("geovae", "torchgeo", "model")}
    order = interleaved(["geovae", "torchgeo", "model"], a.repeats)
    _log(
        f"{tag}: end to end on a {size}^2 mosaic, {model.name}, tile {a.tile} overlap {a.overlap} "
        f"batch {a.batch_size}, order {' '.join(order)}"
    )
    for i, m in enumerate(order):
        runs[m].append(_run_worker(m, scene, model, work, a, f"{tag}#{i}"))
    g, t, mo = runs["geovae"], runs["torchgeo"], runs["model"]
    mpx = g[0]["megapixels"]
    # Ratios per repeat (each repeat holds one run of each side, close together in time).
    speed = [tt["seconds"] / gg["seconds"] for gg, tt in zip(g, t)]
    overhead = [gg["seconds"] / mm["seconds"] for gg, mm in zip(g, mo)]
    # The model-only worker times forward passes only, so its CPU time includes reading the
    # tiles; the CPU-time cross-check is therefore given for geovae vs TorchGeo only.
    cpu_speed = [tt["cpu_s"] / gg["cpu_s"] for gg, tt in zip(g, t) if "cpu_s" in gg and "cpu_s" in tt]
    res = {
        "scene": scene.name,
        "size": size,
        "megapixels": mpx,
        "model": model.name,
        "tile": a.tile,
        "overlap": a.overlap,
        "batch_size": a.batch_size,
        "model_note": note
        or "VAESegmenter base 32, depth 4, latent 8, 6 classes, trained briefly "
        "(40 Adam steps) on pseudo-labels of the Parana scene; saved with save_model",
        "order": order,
        "runs": runs,
        "geovae": _summary(g),
        "torchgeo": _summary(t),
        "model_only": _summary(mo),
        "speedup_geovae_over_torchgeo": median(speed),
        "speedup_per_repeat": speed,
        "cpu_time_ratio_torchgeo_over_geovae": median(cpu_speed) if cpu_speed else None,
        "rss_ratio_geovae_over_torchgeo": max(x["peak_rss_mib"] for x in g) / max(x["peak_rss_mib"] for x in t),
        "overhead_geovae_over_model": median(overhead),
        "overhead_per_repeat": overhead,
        # The same ratio inside each geovae run (its total over its own time in the model):
        # both halves see the same machine load, so it is the steadier reading.
        "overhead_in_run": median([gg["timings_s"]["total_s"] / gg["timings_s"]["model_s"] for gg in g]),
    }
    return res


def _summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
    sec = median([r["seconds"] for r in rs])
    mpx = rs[0]["megapixels"]
    return {
        "seconds_median": sec,
        "mp_per_s": mpx / sec,
        "cpu_s_median": median([r["cpu_s"] for r in rs if "cpu_s" in r]),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
        "rss_after_imports_mib": median([r["rss_after_imports_mib"] for r in rs]),
        "n_polygons": rs[0].get("n_polygons"),
        "n_tiles": rs[0].get("n_tiles", rs[0].get("tiles", {}).get("tiles_run")),
        "timings_s_first_run": rs[0].get("timings_s"),
    }


# -- memory, memscript: memory against scene size ---------------------------------------------


def memory_vs_size(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Peak RSS of geovae (and the TorchGeo loop up to BASELINE_MAX) at every size."""
    model = common.standin_model()
    rows = []
    for k, size in enumerate(a.sizes):
        scene = common.mosaic_vrt(size)
        methods = ["geovae"] + (["torchgeo"] if size <= BASELINE_MAX else [])
        if k % 2:
            methods.reverse()
        row: dict[str, Any] = {"size": size, "megapixels": size * size / 1e6}
        for m in methods:
            try:
                row[m] = _run_worker(m, scene, model, work, a, f"mem{size}")
            except Exception as exc:  # a size that runs out of time is reported, not fatal
                row[m] = {"error": str(exc)[-400:]}
                _log(f"  mem{size} {m} failed: {str(exc)[-200:]}")
        rows.append(row)
    g = [r["geovae"] for r in rows if "peak_rss_mib" in r.get("geovae", {})]
    res: dict[str, Any] = {
        "model": model.name,
        "rows": rows,
        "model_note": "stand-in (avg-pool 8, two 1x1 convs, upsample), trained on the same "
        "pseudo-labels: the pipeline's memory, not the model's compute",
    }
    if len(g) >= 2:
        res["geovae_rss_growth"] = g[-1]["peak_rss_mib"] / g[0]["peak_rss_mib"]
        res["geovae_rss_above_imports_growth"] = (g[-1]["peak_rss_mib"] - g[-1]["rss_after_imports_mib"]) / (
            g[0]["peak_rss_mib"] - g[0]["rss_after_imports_mib"]
        )
    return res


def memory_script(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The pipeline helper's bench_memory.py (1x1-conv model, no vectorising), if present."""
    script = HERE / "bench_memory.py"
    if not script.exists():
        return {"missing": str(script)}
    sizes = [s for s in a.sizes if s <= MEMORY_SCRIPT_MAX] or a.sizes[:1]
    out = work / "bench_memory.json"
    cmd = [
        sys.executable,
        str(script),
        "--sizes",
        ",".join(map(str, sizes)),
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--batch-size",
        str(a.batch_size),
        "--workdir",
        str(work),
        "--json",
        str(out),
    ]
    return _run_script(cmd, out, a.script_timeout)


def _run_script(cmd: list[str], json_out: Path | None, timeout: float) -> dict[str, Any]:
    import subprocess

    _log(f"running {' '.join(Path(c).name if c.startswith('/') else c for c in cmd[1:])}")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=common.ROOT)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout:.0f} s", "stdout": str(exc.stdout or "")[-2000:]}
    res: dict[str, Any] = {
        "cmd": cmd[1:],
        "returncode": p.returncode,
        "wall_s": time.perf_counter() - t0,
        "stdout": p.stdout[-6000:],
    }
    if p.returncode:
        res["error"] = (p.stderr or p.stdout)[-1500:]
    if json_out is not None and json_out.exists():
        res["json"] = json.loads(json_out.read_text())
    return res


# -- vectorize, distributed -------------------------------------------------------------------

_VEC_LINE = re.compile(
    r"^\s+(?P<method>geovae|baseline)\s+(?P<s>[\d.]+) s\s+(?P<mps>[\d.]+) MP/s\s+(?P<pps>[\d.]+) polygons/s\s+"
    r"(?P<n>\d+) polygons\s+peak RSS\s+(?P<rss>[\d.]+) MiB \(after imports (?P<rss0>[\d.]+) MiB\)"
)
_VEC_SCENE = re.compile(r"^scene (?P<tiles>\d+)x\d+ Parana mosaic: (?P<w>\d+) x (?P<h>\d+) px")


def vectorize_bench(a: argparse.Namespace) -> dict[str, Any]:
    """bench_vectorize.py, parsed from its printed table (it writes no JSON)."""
    script = HERE / "bench_vectorize.py"
    if not script.exists():
        return {"missing": str(script)}
    tiles = ["1"] if a.quick else ["1", "2"]
    res = _run_script(
        [sys.executable, str(script), "--tiles", *tiles, "--repeats", str(a.repeats)], None, a.script_timeout
    )
    rows: list[dict[str, Any]] = []
    for line in res.get("stdout", "").splitlines():
        if m := _VEC_SCENE.match(line):
            rows.append({"tiles": int(m["tiles"]), "width": int(m["w"]), "height": int(m["h"])})
        elif (m := _VEC_LINE.match(line)) and rows:
            rows[-1][m["method"]] = {
                "seconds": float(m["s"]),
                "mp_per_s": float(m["mps"]),
                "polygons_per_s": float(m["pps"]),
                "n_polygons": int(m["n"]),
                "peak_rss_mib": float(m["rss"]),
                "rss_after_imports_mib": float(m["rss0"]),
            }
    for r in rows:
        if "geovae" in r and "baseline" in r:
            g, b = r["geovae"], r["baseline"]
            r["speedup_geovae_over_baseline"] = b["seconds"] / g["seconds"]
            r["rss_above_imports_ratio"] = (g["peak_rss_mib"] - g["rss_after_imports_mib"]) / max(
                b["peak_rss_mib"] - b["rss_after_imports_mib"], 1e-9
            )
    res["rows"] = rows
    return res


def distributed_bench(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """bench_distributed.py (1 vs 2 workers on a LocalCluster), when present."""
    script = HERE / "bench_distributed.py"
    if not script.exists():
        return {"missing": str(script)}
    out = work / "bench_distributed.json"
    cmd = [sys.executable, str(script)] + (["--quick"] if a.quick else []) + ["--json", str(out)]
    res = _run_script(cmd, out, a.script_timeout)
    if res.get("returncode") == 2 and "--quick" in cmd:  # an older CLI without --quick/--json
        res = _run_script([sys.executable, str(script)], None, a.script_timeout)
    return res


# -- fcn, tiling, vaespeed, vaememory -----------------------------------------------------------


def _default_vae() -> Path:
    """The benchmark model with the architecture ``geovae train`` builds by default."""
    from geovae.training.task import default_architecture  # torch and Lightning: only when needed

    return common.benchmark_model(arch=default_architecture())


def fcn_end_to_end(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``e2e`` on a TorchGeo FCN checkpoint, tile 512, overlap 64, batch 8."""
    b = argparse.Namespace(**{**vars(a), "tile": 512, "overlap": 64, "batch_size": 8})
    return end_to_end(
        b,
        work,
        model=bench_speed.torchgeo_fcn(),
        size=a.fcn_size,
        tag="fcn",
        note="TorchGeo SemanticSegmentationTask(model='fcn', num_filters=64), 6 classes, 40 Adam "
        "steps on the Parana pseudo-labels, exported with the scene's band statistics",
    )


def _segment(
    scene: Path, model: Path, out: Path, opts: dict[str, Any], a: argparse.Namespace, tag: str
) -> dict[str, Any]:
    rec = run_json(bench_speed.segment_cmd(scene, model, out, opts, a.threads), timeout=a.worker_timeout)
    o = rec["options"]
    _log(
        f"  {tag:22s} {rec['seconds']:7.1f} s  {rec['megapixels'] / rec['seconds']:6.3f} MP/s  "
        f"peak RSS {rec['peak_rss_mib']:6.0f} MiB  tile {o['tile']} overlap {o['overlap']} batch {o['batch_size']}"
    )
    return rec


def tiling(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The default VAE on a real 1024^2 crop, untiled and tiled several ways."""
    scene = bench_speed.crop_tif()
    model = _default_vae()
    runs = {
        "untiled": {"tile": 1024, "overlap": 0},
        "default": {},
        "tile 320, default overlap": {"tile": 320},
        "tile 256, overlap 64": {"tile": 256, "overlap": 64},
        "tile 128, overlap 32": {"tile": 128, "overlap": 32},
    }
    _log(f"tiling: {model.name} on {scene.name}")
    recs = {}
    for name, opts in runs.items():
        recs[name] = _segment(
            scene,
            model,
            work / f"tiling_{len(recs)}",
            opts | {"formats": [], "reconstruction": False},
            a,
            f"tiling {name}",
        )
    cls = {k: Path(r["outputs"]["classes"]) for k, r in recs.items()}
    res: dict[str, Any] = {
        "scene": scene.name,
        "model": model.name,
        "options": {k: r["options"] for k, r in recs.items()},
    }
    res["vs_untiled"] = {k: bench_speed.agreement(cls[k], cls["untiled"]) for k in runs if k != "untiled"}
    res["default_vs_tile320"] = bench_speed.agreement(cls["default"], cls["tile 320, default overlap"], border=0)
    res["t128_vs_t256"] = bench_speed.agreement(cls["tile 128, overlap 32"], cls["tile 256, overlap 64"], border=0)
    for r in recs.values():
        shutil.rmtree(Path(r["outputs"]["classes"]).parent, ignore_errors=True)
    return res


def vae_speed(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The default VAE with geovae's defaults vs a baseline VAE (base 32, depth 4,
    tile 256, overlap 64, batch 8), interleaved, on one mosaic."""
    scene = common.mosaic_vrt(a.vae_size)
    before = common.benchmark_model(arch={"base_channels": 32, "depth": 4})
    now = _default_vae()
    # "before" is the baseline VAE, run without BatchNorm folding; "now unfolded" is the
    # default VAE without folding, the fp32 answer the folded one must agree with.
    sides = {
        "before": (before, {"tile": 256, "overlap": 64, "batch_size": 8, "fold_batchnorm": False}),
        "now": (now, {}),
        "now unfolded": (now, {"fold_batchnorm": False}),
    }
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    order = interleaved(list(sides), a.repeats)
    _log(f"VAE speed on a {a.vae_size}^2 mosaic: before {before.name}, now {now.name}, order {' '.join(order)}")
    for i, k in enumerate(order):
        m, opts = sides[k]
        runs[k].append(_segment(scene, m, work / f"vae_{k}_{i}", opts | {"formats": []}, a, f"vae {k}#{i}"))
    res: dict[str, Any] = {
        "size": a.vae_size,
        "before_model": before.name,
        "now_model": now.name,
        "same_weights": before == now,
        "runs": runs,
    }
    res["speedup_per_repeat"] = [b["seconds"] / n["seconds"] for b, n in zip(runs["before"], runs["now"])]
    res["speedup"] = median(res["speedup_per_repeat"])
    res["cpu_speedup"] = median([b["cpu_s"] / n["cpu_s"] for b, n in zip(runs["before"], runs["now"])])
    res["fold_speedup"] = median([u["seconds"] / n["seconds"] for u, n in zip(runs["now unfolded"], runs["now"])])
    res["fold_cpu_speedup"] = median([u["cpu_s"] / n["cpu_s"] for u, n in zip(runs["now unfolded"], runs["now"])])
    res["mp_per_s"] = {k: median([r["megapixels"] / r["seconds"] for r in v]) for k, v in runs.items()}
    res["fold_agreement"] = bench_speed.agreement(
        Path(runs["now unfolded"][-1]["outputs"]["classes"]), Path(runs["now"][-1]["outputs"]["classes"])
    )
    if res["same_weights"]:  # the same model: the answers must agree too
        res["agreement"] = bench_speed.agreement(
            Path(runs["before"][-1]["outputs"]["classes"]), Path(runs["now"][-1]["outputs"]["classes"])
        )
    for v in runs.values():
        for r in v:
            shutil.rmtree(Path(r["outputs"]["classes"]).parent, ignore_errors=True)
    return res


def vae_memory(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Peak RSS with the default VAE, 2k^2 against a 20k-wide strip (the blender's
    row band, the only part that grows, depends on width only), and a very wide scene with the
    stand-in (0.2 MP/s would take hours for 100 MP of the VAE)."""
    vae = _default_vae()
    rows = []
    for w, h, model, label in (
        (a.vae_memory_sizes[0], a.vae_memory_sizes[0], vae, "default VAE"),
        (a.vae_memory_sizes[1], a.vae_memory_sizes[0], vae, "default VAE"),
        (a.wide, 1024, common.standin_model(), "stand-in"),
    ):
        scene = common.mosaic_vrt(h, width=w)
        rec = _segment(scene, model, work / f"mem_{w}x{h}", {"formats": ["gpkg"]}, a, f"memory {w}x{h}")
        shutil.rmtree(Path(rec["outputs"]["classes"]).parent, ignore_errors=True)
        rows.append(
            {
                "width": w,
                "height": h,
                "model": label,
                **{k: rec[k] for k in ("seconds", "megapixels", "peak_rss_mib", "rss_after_imports_mib", "options")},
            }
        )
    return {"rows": rows, "growth": rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]}


def script_section(module: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``python -m benchmarks.<module>`` (``--quick`` passed on), its JSON and printed summary."""
    out = work / f"{module}.json"
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--threads", str(a.threads), "--json", str(out)]
    cmd += ["--quick"] if a.quick else ["--repeats", str(a.repeats)]
    res = _run_script(cmd, out, a.worker_timeout * 6)
    summary = res.get("stdout", "").split("\n\n", 1)
    res["summary"] = summary[1].strip() if len(summary) > 1 else ""
    return res


# -- the report -------------------------------------------------------------------------------


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the pipeline sections (e2e, memory, vectorize) with the measured value and
    whether it is met, then the models' (:func:`model_targets`)."""
    out: list[dict[str, Any]] = []
    e = r.get("end_to_end")
    if e:
        sp, rr = e["speedup_geovae_over_torchgeo"], e["rss_ratio_geovae_over_torchgeo"]
        cpu = e.get("cpu_time_ratio_torchgeo_over_geovae")
        val = f"x{sp:.2f} wall" + (f", x{cpu:.2f} CPU seconds" if cpu else "")
        out.append({"target": "end-to-end throughput >= 1.5x the TorchGeo loop", "value": val, "met": sp >= 1.5})
        out.append({"target": "lower peak RSS than the TorchGeo loop", "value": f"x{rr:.2f}", "met": rr < 1.0})
        # Judged on the in-run ratio (both halves under the same load); the ratio of separate
        # runs is given alongside, as on a shared machine it swings with the neighbours' load.
        ov, ovx = e["overhead_in_run"], e["overhead_geovae_over_model"]
        out.append(
            {
                "target": "pipeline overhead <= 1.15x model-only time",
                "value": f"x{ov:.2f} in-run (x{ovx:.2f} from separate interleaved runs)",
                "met": ov <= 1.15,
            }
        )
    m = r.get("memory_vs_size")
    if m and "geovae_rss_growth" in m:
        rows = [x for x in m["rows"] if "peak_rss_mib" in x.get("geovae", {})]
        lo, hi = rows[0], rows[-1]
        gr = m["geovae_rss_growth"]
        out.append(
            {
                "target": f"peak RSS flat within 20 % ({lo['size']} -> {hi['size']})",
                "value": f"x{gr:.2f}",
                "met": gr <= 1.2,
            }
        )
        big = [x for x in rows if x["size"] >= 20000]
        if big:
            peak = big[-1]["geovae"]["peak_rss_mib"] * 2**20
            out.append(
                {
                    "target": f"peak RSS < 3 GB at {big[-1]['size']}^2",
                    "value": f"{peak / GB:.2f} GB",
                    "met": peak < 3 * GB,
                }
            )
        else:
            out.append({"target": "peak RSS < 3 GB at 20k^2", "value": "not run (add 20480 to --sizes)", "met": None})
    v = r.get("vectorize", {}).get("rows")
    if v:
        worst = min(v, key=lambda x: x.get("speedup_geovae_over_baseline", 1e9))
        if "speedup_geovae_over_baseline" in worst:
            sp = worst["speedup_geovae_over_baseline"]
            out.append(
                {
                    "target": "vectoriser at least as fast as whole-array shapes + shapely",
                    "value": f"x{sp:.2f} (worst size, {worst['width']}^2)",
                    "met": sp >= 1.0,
                }
            )
        last = v[-1]
        if "rss_above_imports_ratio" in last:
            q = last["rss_above_imports_ratio"]
            out.append(
                {
                    "target": "vectoriser without the whole-array memory growth",
                    "value": f"RSS above imports x{q:.2f} of baseline at {last['width']}^2",
                    "met": q < 1.0,
                }
            )
    return out + model_targets(r)


def model_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the model sections (fcn, tiling, vaespeed, vaememory) with the measured
    value and whether it is met."""
    out: list[dict[str, Any]] = []
    if f := r.get("fcn_end_to_end"):
        ov, ovx = f["overhead_in_run"], f["overhead_geovae_over_model"]
        out.append(
            {
                "target": "fcn: end to end <= 1.05x the model's own forward time (TorchGeo FCN)",
                "value": f"x{ov:.2f} in-run (x{ovx:.2f} from separate interleaved runs)",
                "met": ov <= 1.05,
            }
        )
        sp, cpu = f["speedup_geovae_over_torchgeo"], f.get("cpu_time_ratio_torchgeo_over_geovae")
        out.append(
            {
                "target": "fcn: >= 2x the TorchGeo loop's throughput",
                "value": f"x{sp:.2f} wall" + (f", x{cpu:.2f} CPU seconds" if cpu else ""),
                "met": sp >= 2.0,
            }
        )
        rr = f["rss_ratio_geovae_over_torchgeo"]
        out.append({"target": "fcn: < 0.5x the TorchGeo loop's peak RSS", "value": f"x{rr:.2f}", "met": rr < 0.5})
    if t := r.get("tiling"):
        two, un = t["default_vs_tile320"], min(t["vs_untiled"]["default"], t["vs_untiled"]["tile 320, default overlap"])
        out.append(
            {
                "target": "tiling: two default-overlap tilings agree >= 99.9 %",
                "value": f"{two * 100:.3f} %",
                "met": two >= 0.999,
            }
        )
        out.append(
            {
                "target": "tiling: tiled == untiled >= 99.99 %",
                "value": f"{un * 100:.4f} % (worst of two tilings)",
                "met": un >= 0.9999,
            }
        )
    if v := r.get("vae_speed"):
        val = f"x{v['speedup']:.2f} wall, x{v['cpu_speedup']:.2f} CPU seconds"
        met = v["speedup"] >= 3.0
        if "agreement" in v:
            val += f", agreement {v['agreement'] * 100:.2f} %"
            met = met and v["agreement"] >= 0.995
        else:
            val += " (a different architecture: quality from bench_quality.py, docs/quality.md)"
        if "fold_agreement" in v:  # the same weights with and without folding: the fp32 answer
            val += f"; folded vs unfolded classes agree {v['fold_agreement'] * 100:.3f} %"
            met = met and v["fold_agreement"] >= 0.995
        out.append(
            {"target": "vaespeed: default VAE >= 3x the MP/s of base32/depth4 at 256/64", "value": val, "met": met}
        )
    if m := r.get("vae_memory"):
        r0, r1, wide = m["rows"]
        out.append(
            {
                "target": f"vaememory: default VAE peak RSS flat within 20 % ({r0['width']}^2 -> {r1['width']} wide)",
                "value": f"x{m['growth']:.2f}",
                "met": m["growth"] <= 1.2,
            }
        )
        peak = wide["peak_rss_mib"] * 2**20
        out.append(
            {
                "target": f"vaememory: peak RSS < 3 GB at {wide['width']} px wide",
                "value": f"{peak / GB:.2f} GB",
                "met": peak < 3 * GB,
            }
        )
    if r.get("fcn_end_to_end") or r.get("tiling"):
        out.append({"target": "GPU numbers (benchmarks/gpu.sh)", "value": "run it on a GPU machine", "met": None})
    return out


def print_table(r: dict[str, Any]) -> None:
    """The human summary."""
    m = r["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch {m['torch']} "
        f"({r['options']['threads']} threads), GDAL {m['gdal']}, torchgeo {m['torchgeo']}, load {m['load_avg_1m_at_start']}"
    )
    if e := r.get("end_to_end"):
        print(
            f"\nSpeed against the TorchGeo loop (e2e), {e['size']}^2 mosaic ({e['megapixels']:.1f} MP), tile {r['options']['tile']}, "
            f"overlap {r['options']['overlap']}, batch {r['options']['batch_size']}, {r['options']['repeats']} interleaved repeats"
        )
        print(f"  {'':10s} {'median s':>9s} {'MP/s':>7s} {'peak RSS MiB':>13s} {'polygons':>9s} {'tiles':>6s}")
        for k in ("geovae", "torchgeo", "model_only"):
            s = e[k]
            print(
                f"  {k:10s} {s['seconds_median']:9.1f} {s['mp_per_s']:7.3f} {s['peak_rss_mib']:13.0f} "
                f"{s['n_polygons'] if s['n_polygons'] is not None else '-':>9} {s['n_tiles'] or '-':>6}"
            )
        print(
            f"  geovae/TorchGeo throughput x{e['speedup_geovae_over_torchgeo']:.2f} "
            f"(per repeat {', '.join(f'{x:.2f}' for x in e['speedup_per_repeat'])}); peak RSS x{e['rss_ratio_geovae_over_torchgeo']:.2f}"
        )
        if e.get("cpu_time_ratio_torchgeo_over_geovae"):
            print(
                f"  CPU seconds TorchGeo/geovae x{e['cpu_time_ratio_torchgeo_over_geovae']:.2f} "
                "(steadier than wall time on a shared machine)"
            )
        print(
            f"  geovae/model-only time x{e['overhead_geovae_over_model']:.2f} "
            f"(per repeat {', '.join(f'{x:.2f}' for x in e['overhead_per_repeat'])}); inside the geovae "
            f"runs, total/model time x{e['overhead_in_run']:.2f}"
        )
    if mm := r.get("memory_vs_size"):
        print("\nMemory against scene size (memory; stand-in model; MiB, seconds)")
        for row in mm["rows"]:
            cells = []
            for k in ("geovae", "torchgeo"):
                x = row.get(k)
                if x is None:
                    cells.append(f"{k} -")
                elif "error" in x:
                    cells.append(f"{k} failed")
                else:
                    cells.append(
                        f"{k} {x['peak_rss_mib']:6.0f} MiB {x['seconds']:6.1f} s {x['megapixels'] / x['seconds']:5.2f} MP/s"
                    )
            print(f"  {row['size']:>6}^2  " + "   ".join(cells))
        if "geovae_rss_growth" in mm:
            print(
                f"  geovae peak RSS growth x{mm['geovae_rss_growth']:.2f} (above imports x{mm['geovae_rss_above_imports_growth']:.2f})"
            )
        ms = r.get("memory_script", {})
        if "json" in ms:
            for x in ms["json"]:
                print(
                    f"  bench_memory.py {x['size']:>6}^2  peak RSS {x['peak_rss_mb']:6.0f} MiB  "
                    f"pipeline/pure-model x{x['wall_s'] / x['pure_model_s']:.2f} (1x1-conv model, no polygons)"
                )
        elif ms:
            print(f"  bench_memory.py: {ms.get('missing') or ms.get('error', '')[-200:]}")
    if v := r.get("vectorize"):
        print("\nVectorising (vectorize: bench_vectorize.py)")
        for row in v.get("rows", []):
            g, b = row.get("geovae", {}), row.get("baseline", {})
            if g and b:
                print(
                    f"  {row['width']}x{row['height']}: geovae {g['mp_per_s']:.2f} MP/s {g['polygons_per_s']:.0f} poly/s "
                    f"{g['peak_rss_mib']:.0f} MiB | whole-array {b['mp_per_s']:.2f} MP/s {b['polygons_per_s']:.0f} poly/s "
                    f"{b['peak_rss_mib']:.0f} MiB | speed x{row['speedup_geovae_over_baseline']:.2f}"
                )
        if "missing" in v or "error" in v:
            print(f"  {v.get('missing') or v.get('error', '')[-300:]}")
    if d := r.get("distributed"):
        print("\nDistributed batch (distributed: bench_distributed.py)")
        if "missing" in d:
            print(f"  missing: {d['missing']}")
        else:
            print("  " + "\n  ".join(d.get("stdout", "").strip().splitlines()[-8:]))
            if "error" in d:
                print(f"  error: {d['error'][-300:]}")
    if f := r.get("fcn_end_to_end"):
        print(
            f"\nA TorchGeo checkpoint end to end (fcn), {f['size']}^2 mosaic ({f['megapixels']:.1f} MP), "
            f"tile {f['tile']}, overlap {f['overlap']}, batch {f['batch_size']}"
        )
        for k in ("geovae", "torchgeo", "model_only"):
            x = f[k]
            print(
                f"  {k:10s} {x['seconds_median']:8.1f} s {x['mp_per_s']:7.3f} MP/s  peak RSS {x['peak_rss_mib']:6.0f} MiB"
            )
        tm = f["geovae"]["timings_s_first_run"] or {}
        print(
            "  geovae stages (first run): "
            + ", ".join(f"{k} {v:.1f}" for k, v in tm.items() if isinstance(v, (int, float)))
        )
    if t := r.get("tiling"):
        print(f"\nSeams: tiled against untiled (tiling), {t['scene']} with {t['model']}")
        for k, v in t["vs_untiled"].items():
            o = t["options"][k]
            print(f"  {k:26s} (tile {o['tile']}, overlap {o['overlap']}) == untiled on {v * 100:8.4f} %")
        print(
            f"  default vs tile 320: {t['default_vs_tile320'] * 100:.4f} %; 128/32 vs 256/64: {t['t128_vs_t256'] * 100:.3f} %"
        )
    if v := r.get("vae_speed"):
        print(
            f"\nDefault VAE speed (vaespeed) on a {v['size']}^2 mosaic: before {v['mp_per_s']['before']:.3f} MP/s "
            f"({v['before_model']}, 256/64/8), now {v['mp_per_s']['now']:.3f} MP/s ({v['now_model']}, defaults "
            f"{v['runs']['now'][0]['options']})"
        )
        print(
            f"  BatchNorm folding alone: x{v['fold_speedup']:.2f} wall, x{v['fold_cpu_speedup']:.2f} CPU seconds "
            f"({v['mp_per_s']['now unfolded']:.3f} MP/s unfolded); classes agree on {v['fold_agreement'] * 100:.3f} %"
        )
    if m := r.get("vae_memory"):
        print("\nMemory by scene shape (vaememory)")
        for x in m["rows"]:
            print(
                f"  {x['width']:>6} x {x['height']:<6} {x['model']:12s} {x['peak_rss_mib']:6.0f} MiB "
                f"(after imports {x['rss_after_imports_mib']:.0f})  {x['seconds']:7.1f} s"
            )
    for key, title in (("onnx", "ONNX Runtime against PyTorch (onnx)"), ("loaded", "Beside busy processes (loaded)")):
        if x := r.get(key):
            print(f"\n{title}")
            print("  " + (x.get("summary") or x.get("error", "no output")).replace("\n", "\n  "))
    print("\ntargets (set by issues 6 and 14)")
    for t in r["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        print(f"  [{mark:6s}] {t['target']}: {t['value']}")


#: ``--only`` name -> (key in the results, the function that runs the section), in run order.
SECTIONS: dict[str, tuple[str, Any]] = {
    "e2e": ("end_to_end", end_to_end),
    "memory": ("memory_vs_size", memory_vs_size),
    "memscript": ("memory_script", memory_script),
    "vectorize": ("vectorize", lambda a, work: vectorize_bench(a)),
    "distributed": ("distributed", distributed_bench),
    "fcn": ("fcn_end_to_end", fcn_end_to_end),
    "tiling": ("tiling", tiling),
    "vaespeed": ("vae_speed", vae_speed),
    "vaememory": ("vae_memory", vae_memory),
    "onnx": ("onnx", lambda a, work: script_section("bench_onnx", a, work)),
    "loaded": ("loaded", lambda a, work: script_section("bench_loaded", a, work)),
}


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the sections, print the table, write the JSON."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small scenes and one vectoriser size (a smoke run)")
    p.add_argument("--sizes", help="memory section scene sides, comma-separated (default 2048,8192; quick 512,1024)")
    p.add_argument("--e2e-size", type=int, help="end-to-end scene side (default: the smallest size)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each comparison (default 2)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on every side")
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="sections to run, comma-separated (e2e,memory,memscript,vectorize,distributed,"
        "fcn,tiling,vaespeed,vaememory,onnx,loaded)",
    )
    p.add_argument("--fcn-size", type=int, help="side of the TorchGeo FCN mosaic (default 7808, 61 MP; quick 2048)")
    p.add_argument("--vae-size", type=int, help="side of the VAE speed mosaic (default 2048; quick 1024)")
    p.add_argument("--wide", type=int, help="width of the very wide scene, 1024 rows (default 100096; quick 20480)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--worker-timeout", type=float, default=1200.0, help="seconds before one run is abandoned")
    p.add_argument("--script-timeout", type=float, default=900.0, help="seconds for each other helper's script")
    a = p.parse_args(argv)
    default_sizes = "512,1024" if a.quick else "2048,8192"
    a.sizes = sorted(int(s) for s in (a.sizes or default_sizes).split(","))
    a.e2e_size = a.e2e_size or a.sizes[0]
    a.fcn_size = a.fcn_size or (2048 if a.quick else 7808)
    a.vae_size = a.vae_size or (1024 if a.quick else 2048)
    a.wide = a.wide or (20480 if a.quick else 100096)
    a.vae_memory_sizes = (1024, 4096) if a.quick else (2048, 20480)
    only = set(a.only.split(","))
    common.require_data()

    t0 = time.perf_counter()
    r: dict[str, Any] = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "machine": common.machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _log(f"cache {common.CACHE}; preparing mosaics and models (trained once, then cached)")
    for s in {*a.sizes, a.e2e_size}:
        common.mosaic_vrt(s)
    common.benchmark_model()
    common.standin_model()
    with tempfile.TemporaryDirectory(prefix="geovae-bench-") as tmp:
        work = Path(tmp)
        for name, (key, run) in SECTIONS.items():
            if name in only:
                r[key] = run(a, work)
    r["targets"] = targets(r)
    r["total_s"] = time.perf_counter() - t0
    print_table(r)
    print(f"\ntotal {r['total_s'] / 60:.1f} min")
    if a.json:
        a.json.write_text(json.dumps(r, indent=2, default=str))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
