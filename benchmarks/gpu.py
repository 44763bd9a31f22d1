"""The GPU check, for a machine with a GPU: one run, under 8 minutes.

Prints one JSON line per measurement and a summary table:

* model-only MP/s of the default VAE on tiles already on the device: fp32, bf16 autocast, and
  ``torch.compile`` (bf16), timed with CUDA events;
* end to end (``segment_scene``, scene on disk to rasters) MP/s at the default precision, the
  fraction of its wall time the GPU was busy (NVML utilisation sampled every 50 ms, when
  NVML is there; else the model's own CUDA-event time over the wall time) and the peak GPU
  memory;
* the same model run by onnxruntime (``--backend onnxruntime``: exported in memory, its CUDA
  execution provider), model only and end to end, when ``onnxruntime-gpu`` is installed; the
  record says why not otherwise (the CPU ``onnxruntime`` has no CUDA provider; the GPU wheel,
  about 300 MB, is more than the device tool carries, so there it is installed by hand);
* the CUDA-only tests (``pytest -m cuda``), when pytest and the test dependencies are there.

Usage (on the GPU machine, from the repository root; see benchmarks/gpu.sh, which also installs
the carried wheels)::

    python -m benchmarks.gpu [--device cuda] [--size 4096] [--quick] [--json out.jsonl]

Everything but the GPU calls runs on a CPU too (``--device cpu --quick``), which is how the
test suite keeps this script working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _emit(rec: dict[str, Any], sink: Any) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if sink is not None:
        sink.write(line + "\n")
        sink.flush()


def default_model(device: str) -> Any:
    """The default VAE (random weights, BatchNorm statistics from noise) with its halo measured."""
    import torch

    from geovae.model.base import ModelInfo, SegmentationModel
    from geovae.model.halo import measure_halo
    from geovae.model.vae import VAESegmenter

    torch.manual_seed(0)
    net = VAESegmenter(3, 7)
    # BatchNorm statistics from one pass over normalised noise (a freshly built net's are 0/1,
    # which leaves its probabilities flat and its halo at 0: not the default VAE's workload).
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.randn(4, 3, 256, 256))
    net.eval()
    info = ModelInfo(
        in_channels=3,
        num_classes=7,
        mean=[1000.0] * 3,
        std=[300.0] * 3,
        tile_size=256,
        stride=net.stride,
        arch=net.hparams,
    )
    info.halo = measure_halo(net.eval().to(memory_format=torch.channels_last), 3, net.stride)
    return SegmentationModel(net, info, device)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def onnx_model(model: Any) -> tuple[Any, str | None]:
    """The model exported to ONNX and run by onnxruntime on its device, or None and why not."""
    try:
        from geovae.model.onnx_export import to_onnxruntime

        return to_onnxruntime(model), None
    except Exception as e:  # not installed, no CUDA provider, an export failure: all recorded
        return None, f"{type(e).__name__}: {e}"[:300]


def model_only(
    model: Any, device: str, precision: str, compiled: bool, tile: int, batch: int, reps: int
) -> dict[str, Any]:
    """MP/s of ``predict`` on a batch of tiles already on the device (reconstruction included)."""
    import torch

    m = model.with_precision(precision)
    backend = getattr(m, "backend", "torch")
    if compiled:
        m.net = torch.compile(m.net)
    x = (torch.randn(batch, 3, tile, tile, device=device) * 300 + 1000).contiguous()
    t0 = time.perf_counter()
    m.predict(x, reconstruction=True)  # warm-up (and compilation)
    _sync(device)
    warm = time.perf_counter() - t0
    if device.startswith("cuda") and backend == "torch":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            m.predict(x, reconstruction=True)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            m.predict(x, reconstruction=True)
        seconds = time.perf_counter() - t0
    mp = reps * batch * tile * tile / 1e6
    return {
        "what": "model_only",
        "backend": backend,
        "precision": precision,
        "compiled": compiled,
        "tile": tile,
        "batch": batch,
        "mp_per_s": mp / seconds,
        "warmup_s": warm,
    }


class _Busy:
    """GPU utilisation sampled by NVML in a thread (None when NVML is not there)."""

    def __init__(self, device: str) -> None:
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.handle = None
        if device.startswith("cuda"):
            try:
                import pynvml

                pynvml.nvmlInit()
                index = int(device.split(":")[1]) if ":" in device else 0
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self.nvml = pynvml
            except Exception:
                self.handle = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __enter__(self) -> _Busy:
        if self.handle is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.handle is not None:
            self.thread.join()

    @property
    def fraction(self) -> float | None:
        return sum(self.samples) / (100 * len(self.samples)) if self.samples else None


def scene_file(size: int, folder: Path) -> Path:
    """The real Parana Landsat-8 mosaic when the shared data is there, else a synthetic 3-band
    uint16 scene of smooth random fields (the GPU machine has no data and no network)."""
    try:
        from benchmarks.common import PARANA, mosaic_vrt

        if PARANA.exists():
            return mosaic_vrt(size)
    except Exception:
        pass
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    path = folder / f"synthetic_{size}.tif"
    rng = np.random.default_rng(0)
    coarse = rng.normal(1000, 300, (3, size // 64 + 2, size // 64 + 2)).astype(np.float32)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint16",
        crs="EPSG:32621",
        transform=from_origin(700000, 7000000, 30, 30),
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
    ) as dst:
        for r in range(0, size, 1024):
            h = min(1024, size - r)
            yy = (np.arange(r, r + h) / 64)[:, None]
            xx = (np.arange(size) / 64)[None, :]
            iy, ix = yy.astype(int), xx.astype(int)
            band = coarse[:, iy, ix] + rng.normal(0, 30, (3, h, size))
            dst.write(np.clip(band, 1, 65535).astype("uint16"), window=((r, r + h), (0, size)))
    return path


def end_to_end(model: Any, device: str, size: int, folder: Path) -> dict[str, Any]:
    """``segment_scene`` from the scene on disk to the rasters, at the default precision."""
    import torch

    from geovae.segment import segment_scene

    scene = scene_file(size, folder)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with _Busy(device) as busy:
        t0 = time.perf_counter()
        res = segment_scene(
            scene,
            model,
            folder / "out",
            formats=(),
            quicklook=False,
            progress=False,
            reconstruction=True,
            nodata=0,
            force=True,
        )
        wall = time.perf_counter() - t0
    t = res.report["timings_s"]
    px = res.report["scene"]["width"] * res.report["scene"]["height"]
    return {
        "what": "end_to_end",
        "backend": res.report["model"]["backend"],
        "size": size,
        "mp_per_s": px / 1e6 / wall,
        "wall_s": wall,
        "model_s": t.get("model_s"),
        "predict_s": t.get("predict_s"),
        "busy_fraction_nvml": busy.fraction,
        "model_over_wall": (t.get("model_s") or 0) / wall,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "tile": res.report["options"]["tile"],
        "overlap": res.report["options"]["overlap"],
        "batch_size": res.report["options"]["batch_size"],
        "precision": res.report["options"]["precision"],
    }


def cuda_tests(timeout: float) -> dict[str, Any]:
    """``pytest -m cuda`` (the CUDA-only tests), when pytest and the test dependencies are there."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (subprocess.TimeoutExpired, OSError) as e:
        return {"what": "cuda_tests", "ok": False, "tail": str(e)}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"what": "cuda_tests", "ok": proc.returncode == 0, "tail": tail[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=4096, help="end-to-end scene side in pixels")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing useful")
    ap.add_argument("--no-tests", action="store_true", help="skip pytest -m cuda")
    ap.add_argument("--json", type=Path, help="also append the JSON lines here")
    a = ap.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here; run with --device cpu --quick to check the script", file=sys.stderr)
        return 2
    sink = open(a.json, "a") if a.json else None  # noqa: SIM115
    tile, batch, reps, size = (64, 2, 1, 256) if a.quick else (512, 8, 20, a.size)
    model = default_model(a.device)
    _emit(
        {
            "what": "machine",
            "device": a.device,
            "gpu": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None,
            "torch": torch.__version__,
            "halo": model.info.halo,
        },
        sink,
    )
    results = []
    for precision, compiled in (("fp32", False), ("bf16", False), ("bf16", True)):
        if compiled and a.quick:
            continue  # compiling takes minutes on a CPU; the GPU run does it
        try:
            rec = model_only(model, a.device, precision, compiled, tile, batch, reps)
        except Exception as e:
            rec = {"what": "model_only", "precision": precision, "compiled": compiled, "error": repr(e)[:300]}
        _emit(rec, sink)
        results.append(rec)
    with tempfile.TemporaryDirectory(prefix="geovae-gpu-") as tmp:
        rec = end_to_end(model, a.device, size, Path(tmp))
    _emit(rec, sink)
    results.append(rec)
    ort, why = onnx_model(model)
    if ort is None:
        rec = {"what": "onnxruntime", "error": why}
        _emit(rec, sink)
        results.append(rec)
    else:
        with tempfile.TemporaryDirectory(prefix="geovae-gpu-ort-") as tmp:
            for run in (
                lambda: model_only(ort, a.device, "fp32", False, tile, batch, reps),
                lambda: end_to_end(ort, a.device, size, Path(tmp)),
            ):
                try:
                    rec = run()
                except Exception as e:
                    rec = {"what": "onnxruntime", "error": f"{type(e).__name__}: {e}"[:300]}
                _emit(rec, sink)
                results.append(rec)
    if not a.no_tests and a.device.startswith("cuda"):
        rec = cuda_tests(timeout=180)
        _emit(rec, sink)
        results.append(rec)
    print("\n| measurement | MP/s | notes |\n| --- | --- | --- |")
    for r in results:
        if r["what"] == "onnxruntime":
            print(f"| onnxruntime | | not measured: {r['error']} |")
        elif r["what"] == "model_only":
            name = f"model only, {r['precision']}{' compiled' if r.get('compiled') else ''}"
            name += ", onnxruntime" if r.get("backend") == "onnxruntime" else ""
            print(f"| {name} | {r.get('mp_per_s', float('nan')):.2f} | {r.get('error', '')} |")
        elif r["what"] == "end_to_end":
            busy = r["busy_fraction_nvml"]
            print(
                f"| end to end ({r['size']}², {r['precision']}, {r['backend']}) | {r['mp_per_s']:.2f} | GPU busy "
                f"{'%.0f %%' % (100 * busy) if busy is not None else 'n/a'} (model/wall {r['model_over_wall']:.2f}), "
                f"peak GPU {r['peak_gpu_mib'] or 0:.0f} MiB |"
            )
        else:
            print(f"| CUDA tests | | {'passed' if r['ok'] else 'FAILED'}: {r['tail']} |")
    if sink is not None:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
