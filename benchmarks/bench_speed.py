"""The model sections' pieces: a TorchGeo checkpoint end to end, seams, the VAE's speed, memory by shape.

The orchestration (interleaving, the table, met/missed) lives in ``python -m benchmarks``;
this module holds the pieces it needs:

- :func:`torchgeo_fcn` builds the TorchGeo checkpoint of the ``fcn`` section (a
  ``SemanticSegmentationTask(model="fcn")`` FCN, 64 filters, 6 classes, trained briefly on the
  Parana pseudo-labels) and exports it with the scene's band statistics (``geovae export
  --stats-from``), the path a user who brings a checkpoint takes. Both sides of the
  comparison then load the same module and normalisation.
- :func:`crop_tif` cuts a real 1024 x 1024 window of the Parana scene for the tiling checks.
- The ``segment`` worker runs one ``segment_scene`` in its own process and prints one JSON
  line (seconds, CPU seconds, peak RSS, the run report's timings and options, output paths),
  so that each run's peak RSS is its own.
- :func:`agreement` compares two class rasters away from the scene border.

Standalone worker::

    .venv/bin/python -m benchmarks.bench_speed --segment SCENE MODEL OUT '{"tile": 512}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common


def torchgeo_fcn(cache: Path = common.CACHE, *, steps: int = 40, seed: int = 0) -> Path:
    """The ``fcn`` section's TorchGeo FCN checkpoint, exported to a geovae model file with band statistics.

    Returns:
        Path of the exported ``.safetensors`` file (the ``.ckpt`` lies beside it).
    """
    common.require_data()
    cache.mkdir(parents=True, exist_ok=True)
    from geovae.model.halo import HALO_METHOD

    key = hashlib.sha1(f"fcn64-{steps}-{seed}-{common.NUM_CLASSES}-h{HALO_METHOD}".encode()).hexdigest()[:10]
    out = cache / f"parana_torchgeo_fcn_{key}.safetensors"
    if out.exists():  # before TorchGeo's import, which takes seconds
        return out
    import numpy as np
    import rasterio
    import torch
    from torchgeo.trainers import SemanticSegmentationTask

    from geovae.model.io import export_model

    with rasterio.open(common.PARANA) as src:
        bands = src.read()
    labels = common._pseudo_labels(bands)
    valid = bands[0] > 0
    mean = [float(b[valid].mean()) for b in bands]
    std = [float(b[valid].std()) for b in bands]
    torch.manual_seed(seed)
    task = SemanticSegmentationTask(
        model="fcn",
        backbone="resnet18",
        in_channels=3,
        num_classes=common.NUM_CLASSES,
        num_filters=64,
        loss="ce",
        lr=1e-3,
    )
    x_all = (torch.from_numpy(bands.astype(np.float32)) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    opt = torch.optim.Adam(task.model.parameters(), lr=2e-3)
    task.model.train()
    common._fit_on_crops(
        task.model, opt, x_all, torch.from_numpy(labels), crop=64, steps=steps, rng=np.random.default_rng(seed)
    )
    task.model.eval()
    # What Lightning's ModelCheckpoint writes, minus the optimizer state a user may not keep.
    ckpt = out.with_suffix(".ckpt")
    tmp = ckpt.with_name(ckpt.name + ".part")
    torch.save(
        {"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict(), "epoch": 0, "global_step": steps}, tmp
    )
    os.replace(tmp, ckpt)
    tmp = out.with_name(out.stem + ".part.safetensors")
    export_model(ckpt, tmp, mean=mean, std=std)
    os.replace(tmp, out)
    return out


def crop_tif(cache: Path = common.CACHE, *, size: int = 1024, offset: int = 400) -> Path:
    """A real ``size`` x ``size`` window of the Parana scene (away from its fill corners)."""
    import rasterio
    from rasterio.windows import Window

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"parana_crop_{offset}_{size}.tif"
    if path.exists():
        return path
    with rasterio.open(common.PARANA) as src:
        w = Window(offset, offset, size, size)
        prof = src.profile | {"width": size, "height": size, "transform": src.window_transform(w)}
        tmp = path.with_name(path.stem + ".part.tif")
        with rasterio.open(tmp, "w", **prof) as dst:
            dst.write(src.read(window=w))
    os.replace(tmp, path)
    return path


def agreement(a: Path, b: Path, border: int = 64) -> float:
    """Fraction of valid pixels, ``border`` px away from the scene edge, with the same class."""
    import numpy as np
    import rasterio

    with rasterio.open(a) as da, rasterio.open(b) as db:
        x, y, nd = da.read(1), db.read(1), da.nodata
    if border:
        x, y = x[border:-border, border:-border], y[border:-border, border:-border]
    v = (x != nd) & (y != nd) if nd is not None else np.ones(x.shape, bool)
    return float((x[v] == y[v]).mean())


def run_segment(scene: Path, model: Path, out: Path, opts: dict[str, Any], threads: int) -> dict[str, Any]:
    """One segment_scene in this process; returns its JSON record."""
    import torch

    torch.set_num_threads(threads)
    import geopandas  # noqa: F401  (imported before the clock, as the other workers do)

    from benchmarks.common import load_bench_model
    from geovae.segment import segment_scene

    opts = dict(opts)
    fold = opts.pop("fold_batchnorm", True)  # a load_model option, not a segment_scene one
    kw = dict(device="cpu", nodata=0, quicklook=False, progress=False, force=True) | opts
    with common.metered() as meter:
        t0 = time.perf_counter()
        res = segment_scene(scene, load_bench_model(model, fold_batchnorm=fold), out, **kw)
        seconds = time.perf_counter() - t0
    rep = res.report
    return {
        **meter,
        "seconds": seconds,
        "megapixels": rep["scene"]["width"] * rep["scene"]["height"] / 1e6,
        "width": rep["scene"]["width"],
        "height": rep["scene"]["height"],
        "timings_s": rep["timings_s"],
        "options": {k: rep["options"].get(k) for k in ("tile", "overlap", "batch_size", "block_size")}
        | {"fold_batchnorm": fold},
        "tiles": rep["tiles"],
        "outputs": {k: str(v) for k, v in res.outputs.items()},
        "threads": threads,
    }


def segment_cmd(scene: Path, model: Path, out: Path, opts: dict[str, Any], threads: int) -> list[str]:
    """The command line of one ``segment`` worker."""
    return [
        sys.executable,
        "-m",
        "benchmarks.bench_speed",
        "--segment",
        str(scene),
        str(model),
        str(out),
        json.dumps(opts),
        "--threads",
        str(threads),
    ]


def main() -> None:
    """Command line of one worker."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_speed")
    p.add_argument("--segment", nargs=4, metavar=("SCENE", "MODEL", "OUT", "OPTIONS_JSON"), required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    scene, model, out, opts = a.segment
    rec = run_segment(Path(scene), Path(model), Path(out), json.loads(opts), a.threads)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
