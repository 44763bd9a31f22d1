"""The onnxruntime backend against the torch backend: the default VAE end to end on a mosaic of the NC scene.

What it measures: ``segment_scene`` from the scene on disk to rasters and a GeoPackage, with
the default VAE (the architecture ``geovae train`` builds, trained briefly on the NC scene's
1996 land-class map, so that it records its reconstruction error and the run writes the
reconstruction-error raster as a user's run would), once per side:

``torch``
    the ``.safetensors`` model file (the torch backend, BatchNorm folded, channels_last);
``onnxruntime``
    the same model exported once with ``geovae export --onnx``, run from the ``.onnx`` file
    (geovae's defaults: graph optimisation ``all``, threads that sleep between operators);
``ort-basic``
    the ``.onnx`` file at graph optimisation level ``basic`` (constant folding and simple
    fusions, no NCHWc convolution layout): what the optimisation level is worth;
``ort-spin``
    the ``.onnx`` file with ``session.intra_op.allow_spinning=1``, onnxruntime's own default:
    threads spin-wait between operators, which takes CPU from the run's helper threads;
``int8`` (``--int8``)
    the ``.onnx`` file quantised to INT8 by ``onnxruntime.quantization.quantize_static``
    (QDQ, per-channel weights, calibrated on 32 tiles of the NC scene): its class agreement
    with the torch run is printed beside its speed. geovae ships no INT8 option: measured on
    the NC scene it agreed on fewer than the 99.5 % of the pixels issue 28 asks for.

Every side uses the same torch/onnxruntime intra-op thread count (``--threads``). Each run is a
subprocess of its own, the sides interleaved (A B C, C B A, ...) so that a busy machine's drift
hits every side alike; ratios are taken per repeat and the median printed. The model's own
time is the run report's ``timings_s.model_s`` (the seconds inside ``SegmentationModel.predict``).

Usage::

    .venv/bin/python -m benchmarks.bench_onnx                       # 3 x 3 NC mosaic, 3 repeats
    .venv/bin/python -m benchmarks.bench_onnx --quick               # smoke run: the scene once, 1 repeat
    .venv/bin/python -m benchmarks.bench_onnx --sides torch,onnxruntime --int8 --json out.json

Worker (one run, one JSON line)::

    .venv/bin/python -m benchmarks.bench_onnx --worker SIDE SCENE MODEL OUT --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import interleaved, median, run_json

SIDES = ("torch", "onnxruntime", "ort-basic", "ort-spin", "int8")
#: How each onnxruntime side configures its sessions.
ORT_SETTINGS: dict[str, dict[str, Any]] = {
    "onnxruntime": {},
    "ort-basic": {"optimization": "basic"},
    "ort-spin": {"session_config": {"session.intra_op.allow_spinning": "1"}},
    "int8": {},
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the model ---------------------------------------------------------------------------------


def nc_default_vae(cache: Path = common.CACHE, *, epochs: int = 10, seed: int = 0) -> Path:
    """The default VAE trained on the NC scene's land-class map with ``geovae.train_model``.

    Returns:
        The ``.safetensors`` file (cached by recipe).
    """
    from geovae.demo import CLASSES
    from geovae.model.halo import HALO_METHOD
    from geovae.training.task import default_architecture

    common.require_data()
    cache.mkdir(parents=True, exist_ok=True)
    arch = default_architecture()
    key = hashlib.sha1(f"nc-{sorted(arch.items())}-{epochs}-{seed}-h{HALO_METHOD}".encode()).hexdigest()[:10]
    path = cache / f"nc_default_vae_{key}.safetensors"
    if path.exists():
        return path
    from geovae.training import train_model

    tmp = path.with_name(path.stem + ".part.safetensors")
    train_model(
        common.NC_SCENE,
        common.NC_LABELS,
        tmp,
        classes=",".join(f"{k}:{v}" for k, v in CLASSES.items()),
        tile=64,
        epochs=epochs,
        seed=seed,
        val_fraction=0.0,
        device="cpu",
        progress=False,
    )
    os.replace(tmp, path)
    return path


def exported(model: Path) -> Path:
    """``geovae export --onnx`` of ``model``, checked on the NC scene (cached beside it, under
    a name that changes with the exporter's source: a graph an older exporter wrote is not
    the one this code writes)."""
    import geovae.model.onnx_export

    source = Path(geovae.model.onnx_export.__file__).read_bytes()
    out = model.with_name(f"{model.stem}.{hashlib.sha1(source).hexdigest()[:8]}.onnx")
    if out.exists():
        return out
    from geovae.model.io import export_model

    tmp = out.with_name(out.stem + ".part.onnx")
    export_model(model, tmp, onnx=True, check_with=common.NC_SCENE)
    os.replace(tmp, out)
    return out


def quantised(onnx_path: Path, *, tiles: int = 32, seed: int = 0) -> Path:
    """The ``.onnx`` file quantised to INT8 (QDQ, per-channel), calibrated on NC tiles, with its metadata."""
    out = onnx_path.with_name(onnx_path.stem + f".int8-{tiles}-{seed}.onnx")
    if out.exists():
        return out
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from rasterio.windows import Window

    from geovae.model.onnx import load_onnx
    from geovae.scene import open_scene

    m = load_onnx(onnx_path, device="cpu")
    sc = open_scene(common.NC_SCENE, nodata=0)
    rng = np.random.default_rng(seed)
    side = m.info.tile_size
    mean = np.asarray(m.info.mean, np.float32)
    batch = []
    for _ in range(tiles):
        r, c = int(rng.integers(0, sc.height - side)), int(rng.integers(0, sc.width - side))
        d, v = sc.read(Window(c, r, side, side))
        sc.fill_missing(d, v, mean)
        batch.append(d)
    sc.close()
    import torch

    x = m.normalise(torch.from_numpy(np.stack(batch))).numpy()
    stride, latent = m.info.stride, m.latent_channels or 1

    class Tiles(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, Any] | None:
            if self.i >= len(x):
                return None
            b = x[self.i : self.i + 4]
            self.i += 4
            feeds = {"x": b}
            if "noise" in m.inputs:
                shape = (2, len(b), latent, side // stride, side // stride)
                feeds["noise"] = rng.standard_normal(shape).astype(np.float32)
            return feeds

    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "q.onnx"
        quantize_static(
            str(onnx_path),
            str(q),
            Tiles(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        proto = onnx.load(str(q))
    del proto.metadata_props[:]
    proto.metadata_props.extend(m.proto.metadata_props)
    tmp_out = out.with_name(out.stem + ".part.onnx")
    onnx.save(proto, str(tmp_out))
    os.replace(tmp_out, out)
    return out


# -- one run -----------------------------------------------------------------------------------


def run_side(side: str, scene: Path, model: Path, out: Path, threads: int, samples: int = 0) -> dict[str, Any]:
    """One ``segment_scene`` of ``side`` in this process; its JSON record."""
    import torch

    torch.set_num_threads(threads)
    import geopandas  # noqa: F401  (imported before the clock, as every side does)

    from geovae.model.io import load_model
    from geovae.segment import segment_scene

    with common.metered() as meter:
        t0 = time.perf_counter()
        m = load_model(model, device="cpu")
        for k, v in ORT_SETTINGS.get(side, {}).items():
            setattr(m, k, v)  # read when the first session is made, at the first batch
        load_s = time.perf_counter() - t0
        res = segment_scene(
            scene,
            m,
            out,
            device="cpu",
            nodata=0,
            quicklook=False,
            progress=False,
            force=True,
            formats=["gpkg"],
            reconstruction=True,
            samples=samples,
        )
        seconds = time.perf_counter() - t0
    rep = res.report
    return {
        **meter,
        "side": side,
        "seconds": seconds,
        "load_s": load_s,
        "megapixels": rep["scene"]["width"] * rep["scene"]["height"] / 1e6,
        "model_s": rep["timings_s"]["model_s"],
        "timings_s": rep["timings_s"],
        "options": {k: rep["options"].get(k) for k in ("tile", "overlap", "batch_size", "backend")},
        "classes": str(res.outputs["classes"]),
        "threads": threads,
        "samples": samples,
    }


def agreement(a: str | Path, b: str | Path) -> float:
    """Fraction of the pixels valid in both class rasters with the same class."""
    import rasterio

    with rasterio.open(a) as da, rasterio.open(b) as db:
        x, y, nd = da.read(1), db.read(1), da.nodata
    v = (x != nd) & (y != nd)
    return float((x[v] == y[v]).mean())


# -- the comparison ----------------------------------------------------------------------------


def compare(a: argparse.Namespace) -> dict[str, Any]:
    """The sides interleaved on the mosaic; per-side medians and per-repeat ratios to torch."""
    st = nc_default_vae(epochs=a.epochs)
    onnx_path = exported(st)
    models = {s: (st if s == "torch" else quantised(onnx_path) if s == "int8" else onnx_path) for s in a.sides}
    import rasterio

    with rasterio.open(common.NC_SCENE) as ds:
        w, h = ds.width, ds.height
    scene = (
        common.NC_SCENE if a.tiles == 1 else common.mosaic_vrt(h * a.tiles, width=w * a.tiles, source=common.NC_SCENE)
    )
    order = interleaved(list(a.sides), a.repeats)
    _log(f"{scene.name} ({a.tiles}x{a.tiles} NC), {st.name}, threads {a.threads}, order {' '.join(order)}")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in a.sides}
    with tempfile.TemporaryDirectory(prefix="geovae-bench-onnx-") as tmp:
        keep = Path(tmp) / "classes"
        keep.mkdir()
        for i, side in enumerate(order):
            out = Path(tmp) / f"{side}_{i}"
            cmd = [sys.executable, "-m", "benchmarks.bench_onnx", "--worker", side, str(scene), str(models[side])]
            cmd += [str(out), "--threads", str(a.threads), "--samples", str(a.samples)]
            rec = run_json(cmd, timeout=a.worker_timeout)
            kept = keep / f"{side}_{i}.tif"
            shutil.copy(rec["classes"], kept)
            rec["classes"] = str(kept)
            shutil.rmtree(out, ignore_errors=True)
            runs[side].append(rec)
            _log(
                f"  {side:12s} {rec['seconds']:7.1f} s  {rec['megapixels'] / rec['seconds']:6.3f} MP/s  "
                f"model {rec['model_s']:6.1f} s  CPU {rec['cpu_s']:6.1f} s  peak RSS {rec['peak_rss_mib']:5.0f} MiB"
            )
        res: dict[str, Any] = {
            "scene": scene.name,
            "tiles": a.tiles,
            "model": st.name,
            "threads": a.threads,
            "samples": a.samples,
        }
        res["sides"] = {}
        base = runs.get("torch")
        for side, rs in runs.items():
            mpx = rs[0]["megapixels"]
            d: dict[str, Any] = {
                "seconds": median([r["seconds"] for r in rs]),
                "mp_per_s": mpx / median([r["seconds"] for r in rs]),
                "model_s": median([r["model_s"] for r in rs]),
                "model_mp_per_s": mpx / median([r["model_s"] for r in rs]),
                "cpu_s": median([r["cpu_s"] for r in rs]),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            }
            if base is not None and side != "torch":
                d["speedup"] = median([t["seconds"] / r["seconds"] for t, r in zip(base, rs)])
                d["model_speedup"] = median([t["model_s"] / r["model_s"] for t, r in zip(base, rs)])
                d["cpu_ratio"] = median([t["cpu_s"] / r["cpu_s"] for t, r in zip(base, rs)])
                d["class_agreement"] = agreement(base[-1]["classes"], rs[-1]["classes"])
            res["sides"][side] = d
        res["runs"] = runs
    return res


def print_summary(res: dict[str, Any]) -> None:
    print(
        f"\n{res['scene']} ({res['tiles']}x{res['tiles']} NC scene), {res['model']}, {res['threads']} threads, "
        f"{res.get('samples', 0)} latent samples; "
        "medians, ratios to torch per repeat"
    )
    print(f"  {'side':12s} {'MP/s':>7s} {'model MP/s':>11s} {'speed':>7s} {'model':>7s} {'CPU':>7s} {'classes':>9s}")
    for side, d in res["sides"].items():
        ratio = (
            f"x{d['speedup']:5.2f}  x{d['model_speedup']:5.2f}  x{d['cpu_ratio']:5.2f}"
            if "speedup" in d
            else f"{'-':>6s}  {'-':>6s}  {'-':>6s}"
        )
        agree = f"{100 * d['class_agreement']:8.3f}%" if "class_agreement" in d else f"{'-':>9s}"
        print(f"  {side:12s} {d['mp_per_s']:7.3f} {d['model_mp_per_s']:11.3f} {ratio} {agree}")


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_onnx",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--worker", nargs=4, metavar=("SIDE", "SCENE", "MODEL", "OUT"))
    p.add_argument("--tiles", type=int, help="mosaic of TILES x TILES NC scenes (default 3; quick 1)")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick 1)")
    p.add_argument("--epochs", type=int, help="training epochs of the default VAE (default 10; quick 1)")
    p.add_argument("--sides", default="torch,onnxruntime,ort-basic,ort-spin", help=f"among {', '.join(SIDES)}")
    p.add_argument("--int8", action="store_true", help="also the INT8-quantised graph (its class agreement)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads on every side")
    p.add_argument("--samples", type=int, default=0, help="latent samples per tile (default 0, segment's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: the scene once, 1 repeat, 1 training epoch")
    p.add_argument("--worker-timeout", type=float, default=1800.0)
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args()
    if a.worker:
        side, scene, model, out = a.worker
        print(json.dumps(run_side(side, Path(scene), Path(model), Path(out), a.threads, a.samples)))
        return
    a.tiles = a.tiles or (1 if a.quick else 3)
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.epochs = a.epochs or (1 if a.quick else 10)
    a.sides = [s for s in a.sides.split(",") if s] + (["int8"] if a.int8 else [])
    unknown = set(a.sides) - set(SIDES)
    if unknown:
        p.error(f"unknown sides {', '.join(sorted(unknown))}; use {', '.join(SIDES)}")
    res = {"machine": common.machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **compare(a)}
    print_summary(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
