"""Shared pieces of the benchmarks: real-data mosaics, the benchmark model, subprocess runs.

Every measurement runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its
own, and comparisons are ratios of runs interleaved within one invocation (A B A B ...) so
that the drift of a shared, noisy machine hits both sides alike. Nothing here holds a
timing constant: every number in the report is measured.

Scenes are VRT mosaics of the real Landsat-8 Parana scene (2041 x 1860 x 3 uint16, 0 = fill
without a nodata tag), repeated on a grid and cropped to N x N pixels. They are written (as
small XML files) into a cache folder outside the repository, never into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEOVAE_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()
PARANA = DATA / "landsat8_parana" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
#: The NC Landsat-7 scene (489 x 443, 6 bands uint8, 0 = nodata) and its 1996 land-class map.
NC_SCENE = DATA / "nc_landsat7_landclass96" / "nc_lsat7_2000_6band_uint8.tif"
NC_LABELS = DATA / "nc_landsat7_landclass96" / "nc_landclass96_label_uint8.tif"
#: Cache of mosaics and the benchmark model; outside the repository on purpose.
CACHE = Path(os.environ.get("GEOVAE_BENCH_CACHE", Path(tempfile.gettempdir()) / "geovae-bench-cache"))

#: Number of classes of the benchmark model (3 brightness terciles x red-above-green or not).
NUM_CLASSES = 6


# -- the machine ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM and library versions, for the record next to every result."""
    import psutil
    import rasterio
    import torch
    import torchgeo

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torchgeo": torchgeo.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "platform": platform.platform(),
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process alone, in MiB.

    Linux's ``VmHWM`` (the high-water mark of this process's own address space). Not
    ``ru_maxrss``: across fork and exec Linux carries the parent's high-water mark into the
    child's ``ru_maxrss``, so a worker started by a parent holding 1.4 GiB (torch, a model just
    trained) reports at least 1.4 GiB whatever it uses itself. ``ru_maxrss`` is the fallback
    where there is no ``/proc``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def metered() -> Iterator[dict[str, float]]:
    """Measure the block: yields a dict that holds, once the block ends, ``cpu_s`` (CPU
    seconds of all threads: on a shared machine other jobs stretch wall time far more than
    the CPU time a run needs, so CPU ratios are the steadier cross-check),
    ``rss_after_imports_mib`` (the peak before the block) and ``peak_rss_mib``."""
    rec: dict[str, float] = {}
    rss0 = peak_rss_mib()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    yield rec
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    rec.update(
        cpu_s=(ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        rss_after_imports_mib=rss0,
        peak_rss_mib=peak_rss_mib(),
    )


# -- scenes --------------------------------------------------------------------------------


def require_data() -> None:
    """Exit with one clear line when the real data is absent."""
    if not PARANA.exists():
        sys.exit(f"real data not found: {PARANA} (set GEOVAE_TEST_DATA to the shared data folder)")


def mosaic_vrt(size: int, cache: Path = CACHE, *, width: int | None = None, source: Path = PARANA) -> Path:
    """A ``size`` x ``size`` VRT (``width`` x ``size`` when ``width`` is given) that repeats the
    Parana scene (or ``source``) on a grid, cropped to size.

    The mosaic keeps the scene's CRS and pixel size and continues its grid to the right and
    down, so every copy is georeferenced where it lies. VRT sources cannot be mirrored, so
    copies are repeated; the scene's fill corners (value 0) make realistic nodata wedges
    at every copy's edge. No nodata is tagged, as in the original file: pass ``nodata=0``.

    Args:
        size: side (height) in pixels.
        cache: folder for the VRT (created if missing).
        width: width in pixels, when it differs from the height (very wide scenes).
        source: the scene repeated (its nodata tag, if any, is not copied).

    Returns:
        Path of the VRT (written once, reused afterwards).
    """
    import rasterio

    require_data()
    cache.mkdir(parents=True, exist_ok=True)
    height, width = size, width or size
    name = "parana" if source == PARANA else source.stem
    path = cache / (f"{name}_mosaic_{size}.vrt" if width == height else f"{name}_mosaic_{width}x{height}.vrt")
    if path.exists():
        return path
    with rasterio.open(source) as src:
        w, h, count = src.width, src.height, src.count
        t = src.transform
        crs_wkt = src.crs.to_wkt()
        dtype = src.dtypes[0]
        bw, bh = src.block_shapes[0][1], src.block_shapes[0][0]
    gdal_type = {"uint16": "UInt16", "uint8": "Byte", "int16": "Int16", "float32": "Float32"}[dtype]
    bands = []
    for b in range(1, count + 1):
        sources = []
        for r0 in range(0, height, h):
            for c0 in range(0, width, w):
                sw, sh = min(w, width - c0), min(h, height - r0)
                sources.append(
                    f"""    <SimpleSource>
      <SourceFilename relativeToVRT="0">{source}</SourceFilename>
      <SourceBand>{b}</SourceBand>
      <SourceProperties RasterXSize="{w}" RasterYSize="{h}" DataType="{gdal_type}" BlockXSize="{bw}" BlockYSize="{bh}"/>
      <SrcRect xOff="0" yOff="0" xSize="{sw}" ySize="{sh}"/>
      <DstRect xOff="{c0}" yOff="{r0}" xSize="{sw}" ySize="{sh}"/>
    </SimpleSource>"""
                )
        bands.append(
            f'  <VRTRasterBand dataType="{gdal_type}" band="{b}">\n' + "\n".join(sources) + "\n  </VRTRasterBand>"
        )
    gt = f"{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}"
    xml = (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f"  <SRS>{_xml_escape(crs_wkt)}</SRS>\n  <GeoTransform>{gt}</GeoTransform>\n"
        + "\n".join(bands)
        + "\n</VRTDataset>\n"
    )
    tmp = path.with_suffix(".vrt.part")
    tmp.write_text(xml)
    os.replace(tmp, path)  # a half-written VRT never sits under the final name
    return path


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# -- the benchmark model ---------------------------------------------------------------------


def _pseudo_labels(bands: Any) -> Any:
    """Six land-cover-like classes from the scene itself: brightness terciles x (red > green).

    They are not ground truth; they only make a briefly trained model produce spatially
    coherent classes, so the polygon counts (and the vectoriser's load) look like a real
    land-cover map rather than the salt-and-pepper of a random-init network.
    """
    import numpy as np

    b2, b3, b4 = bands.astype(np.float32)
    valid = b2 > 0
    bright = (b2 + b3 + b4) / 3
    terc = np.digitize(bright, np.quantile(bright[valid], [1 / 3, 2 / 3]))
    lab = (terc + 3 * (b4 > 1.05 * b3)).astype(np.int64)
    lab[~valid] = -100  # ignored by cross-entropy
    return lab


def _fit_on_crops(model: Any, opt: Any, x_all: Any, y_all: Any, *, crop: int, steps: int, rng: Any) -> float:
    """Cross-entropy steps on batches of 8 random crops from the scene's valid centre, where the
    fill corners cannot dominate a batch; returns the last loss."""
    import torch

    h, w = y_all.shape
    for _ in range(steps):
        rs = rng.integers(h // 6, h - h // 6 - crop, 8)
        cs = rng.integers(w // 6, w - w // 6 - crop, 8)
        x = torch.stack([x_all[:, r : r + crop, c : c + crop] for r, c in zip(rs, cs)])
        y = torch.stack([y_all[r : r + crop, c : c + crop] for r, c in zip(rs, cs)])
        loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def benchmark_model(
    cache: Path = CACHE, *, base_channels: int = 32, steps: int = 40, seed: int = 0, arch: dict[str, Any] | None = None
) -> Path:
    """A VAESegmenter (default size unless told) trained briefly on Parana, saved with save_model.

    Training: ``steps`` Adam steps of cross-entropy on batches of 8 random 64 x 64 crops against the
    pseudo-labels of :func:`_pseudo_labels`, with the scene-wide band means and standard
    deviations (valid pixels) stored in the model file, as ``geovae segment`` expects. The
    compute per pixel, which is what the benchmarks measure, does not depend on training.

    Args:
        cache: folder for the model file (reused when its recipe is unchanged).
        base_channels: width of the full-resolution features.
        steps: optimiser steps.
        seed: random seed.
        arch: VAESegmenter keyword arguments instead of ``base_channels`` (e.g.
            ``geovae.training.task.default_architecture()``); the file name records the
            resolved ones.

    Returns:
        Path of the ``.safetensors`` model file.
    """
    import numpy as np
    import rasterio
    import torch

    from geovae.model.base import ModelInfo
    from geovae.model.io import save_model
    from geovae.model.vae import VAESegmenter

    require_data()
    cache.mkdir(parents=True, exist_ok=True)
    from geovae.model.halo import HALO_METHOD

    # The halo method is in the key: a file with an older one would be measured again at
    # every load, inside the benchmarks' clocks.
    if arch is None:
        key = hashlib.sha1(f"v2-b8-{base_channels}-{steps}-{seed}-{NUM_CLASSES}-h{HALO_METHOD}".encode()).hexdigest()[
            :10
        ]
        path = cache / f"parana_vae_b{base_channels}_{key}.safetensors"
        arch = {"base_channels": base_channels}
    else:
        # Resolve the defaults now, so a changed default is a different cached file.
        hp = VAESegmenter(3, NUM_CLASSES, **arch)._hparams
        key = hashlib.sha1(f"v3-{sorted(hp.items())}-{steps}-{seed}-h{HALO_METHOD}".encode()).hexdigest()[:10]
        path = cache / f"parana_vae_b{hp['base_channels']}d{hp['depth']}_{key}.safetensors"
    if path.exists():
        return path
    with rasterio.open(PARANA) as src:
        bands = src.read()
    labels = _pseudo_labels(bands)
    valid = bands[0] > 0
    mean = [float(b[valid].mean()) for b in bands]
    std = [float(b[valid].std()) for b in bands]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = VAESegmenter(3, NUM_CLASSES, **arch)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_all = (torch.from_numpy(bands.astype(np.float32)) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    y_all = torch.from_numpy(labels)
    model.train()
    final_loss = _fit_on_crops(model, opt, x_all, y_all, crop=64, steps=steps, rng=rng)
    model.eval()
    names = [f"{b} {v}" for v in ("green-dominant", "red-dominant") for b in ("dark", "mid", "bright")]
    info = ModelInfo(
        in_channels=3,
        num_classes=NUM_CLASSES,
        class_names=names,
        mean=mean,
        std=std,
        band_names=["B2", "B3", "B4"],
        tile_size=256,
        extra={
            "trained_on": "benchmark pseudo-labels of the Landsat-8 Parana scene",
            "steps": steps,
            "final_loss": final_loss,
        },
    )
    tmp = path.with_name(path.name + ".tmp.safetensors")
    save_model(tmp, model, info)
    os.replace(tmp, path)
    return path


class StandInSegmenter:
    """Namespace for the stand-in model used where the default model is too slow to finish.

    Memory against scene size is a property of the pipeline (tile, batch and block sizes),
    not of the model's compute. On 2 shared CPU cores the default VAESegmenter runs at well
    under 0.1 MP/s, so a 20k x 20k scene would take hours; the stand-in (average-pool by 8,
    two 1x1 convolutions, bilinear upsampling) costs almost nothing per pixel yet still draws
    a smooth land-cover-like map (trained on the same pseudo-labels), so reading, blending,
    writing and vectorising see a realistic load.
    """

    POOL = 8

    @staticmethod
    def build(in_channels: int, num_classes: int, hidden: int = 16) -> Any:
        """The nn.Module (a plain Sequential, so it needs no class to unpickle or import)."""
        from torch import nn

        p = StandInSegmenter.POOL
        return nn.Sequential(
            nn.AvgPool2d(p),
            nn.Conv2d(in_channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, num_classes, 1),
            nn.Upsample(scale_factor=p, mode="bilinear", align_corners=False),
        )


def standin_model(cache: Path = CACHE, *, steps: int = 300, seed: int = 0) -> Path:
    """Train the stand-in briefly on the Parana pseudo-labels and save it (safetensors + info).

    Returns:
        Path of the file; load it with :func:`load_bench_model`.
    """
    import numpy as np
    import rasterio
    import torch
    from safetensors.torch import save_file

    from geovae.model.base import ModelInfo

    require_data()
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(f"standin-v1-{StandInSegmenter.POOL}-{steps}-{seed}-{NUM_CLASSES}".encode()).hexdigest()[:10]
    path = cache / f"parana_standin_{key}.safetensors"
    if path.exists():
        return path
    with rasterio.open(PARANA) as src:
        bands = src.read()
    labels = torch.from_numpy(_pseudo_labels(bands))
    valid = bands[0] > 0
    mean = [float(b[valid].mean()) for b in bands]
    std = [float(b[valid].std()) for b in bands]
    x_all = (torch.from_numpy(bands.astype(np.float32)) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = StandInSegmenter.build(3, NUM_CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    final_loss = _fit_on_crops(model, opt, x_all, labels, crop=128, steps=steps, rng=rng)
    info = ModelInfo(
        in_channels=3,
        num_classes=NUM_CLASSES,
        mean=mean,
        std=std,
        tile_size=256,
        stride=StandInSegmenter.POOL,
        kind="benchmark-standin",
        extra={"final_loss": final_loss},
    )
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp),
        metadata={"standin": json.dumps(info.to_dict())},
    )
    os.replace(tmp, path)
    return path


def load_bench_model(path: Path, device: str = "cpu", fold_batchnorm: bool = True) -> Any:
    """A :class:`~geovae.model.base.SegmentationModel` from a geovae model file, a TorchGeo
    checkpoint or a stand-in file (``fold_batchnorm`` as in ``load_model``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from geovae.model.base import ModelInfo, SegmentationModel

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        meta = {}
    if "standin" not in meta:
        from geovae.model.io import load_model

        return load_model(path, device, fold_batchnorm=fold_batchnorm)
    info = ModelInfo.from_dict(json.loads(meta["standin"]))
    module = StandInSegmenter.build(info.in_channels, info.num_classes)
    module.load_state_dict(load_file(str(path)))
    return SegmentationModel(module, info, device=device)


# -- subprocess runs -------------------------------------------------------------------------


def run_json(cmd: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a worker command; its last stdout line is one JSON object, which is returned.

    Args:
        cmd: the command.
        timeout: seconds before the worker is killed (``TimeoutExpired`` propagates).
        env: extra environment variables.

    Returns:
        The worker's JSON, plus ``wall_s`` (the subprocess's wall time, start-up included).

    Raises:
        RuntimeError: the worker failed; the message carries its stderr's tail.
    """
    t0 = time.perf_counter()
    res = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"worker {' '.join(cmd[-6:])} failed (exit {res.returncode}):\n{tail}")
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker {' '.join(cmd[-6:])} printed no JSON: {res.stdout[-500:]}")
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    return out


def whole_array_polygons(classes: Any, valid: Any, transform: Any, crs: Any) -> Any:
    """Polygons of a whole class array at once, the recipe of rasterio's documentation.

    ``rasterio.features.shapes`` over the full array, shapely polygons, a GeoDataFrame with
    ``class_id`` and ``area_m2``: the baseline that both the TorchGeo loop
    (``bench_torchgeo``) and the vectoriser benchmark (``bench_vectorize``) compare against.
    """
    import geopandas as gpd
    import numpy as np
    import rasterio.features
    import shapely.geometry

    geoms, values = [], []
    for geom, value in rasterio.features.shapes(classes, mask=valid, connectivity=4, transform=transform):
        geoms.append(shapely.geometry.shape(geom))
        values.append(int(value))
    gdf = gpd.GeoDataFrame({"class_id": np.asarray(values, np.int32)}, geometry=geoms, crs=crs)
    gdf["area_m2"] = gdf.area
    return gdf


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence (NaN when empty)."""
    return statistics.median(xs) if xs else float("nan")


def interleaved(methods: Sequence[str], repeats: int) -> list[str]:
    """Run order A B C, C B A, A B C...: each method sees early and late positions alike."""
    order: list[str] = []
    for r in range(repeats):
        order.extend(methods if r % 2 == 0 else list(reversed(methods)))
    return order
