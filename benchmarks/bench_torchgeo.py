"""geovae end to end against the TorchGeo loop a user would write, and against the model alone.

Three workers, each run in its own subprocess (its peak RSS is its own) and interleaved by
:mod:`benchmarks.__main__` so that machine drift cancels in the ratios:

``geovae``
    :func:`geovae.segment_scene` from the scene to a class raster, a confidence raster and a
    GeoPackage of polygons (no quicklook, no GeoJSON: the baseline writes neither).
``torchgeo``
    What TorchGeo 0.10's documentation leads a user to write: a ``RasterDataset`` over the
    scene, a ``GriddedPatchSampler`` (the 0.10 name of the deprecated ``GridGeoSampler``)
    with the same tile and stride, a ``DataLoader`` with ``stack_samples`` and
    ``num_workers=0``, the same nn.Module and normalisation, softmax probabilities averaged
    into full-scene numpy arrays, argmax and max written with rasterio, and
    ``rasterio.features.shapes`` + shapely into a GeoPackage with pyogrio.
``model``
    The ceiling: the same tiles geovae runs (all-nodata tiles skipped, nodata filled with the
    band means), already in memory, through ``SegmentationModel.predict`` batch by batch.
    Only the forward passes are timed.

Every worker prints one JSON line. Standalone::

    .venv/bin/python -m benchmarks.bench_torchgeo --worker geovae SCENE MODEL OUT [--tile 256 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks import common

WORKERS = ("geovae", "torchgeo", "model")


def _threads(n: int) -> None:
    import torch

    # Same intra-op thread count for every side; GDAL and the reader thread are left as a
    # user would have them.
    torch.set_num_threads(n)


def _count_features(path: Path) -> int:
    import pyogrio

    return int(pyogrio.read_info(path)["features"])


def run_geovae(
    scene: Path, model: Path, out: Path, *, tile: int, overlap: int, batch_size: int, block_size: int = 1024
) -> dict[str, Any]:
    """segment_scene from scene to classes, confidence and a GeoPackage of polygons.

    Returns:
        seconds, megapixels, polygons, the run report's timings and tile summary.
    """
    from benchmarks.common import load_bench_model
    from geovae.segment import segment_scene

    t0 = time.perf_counter()
    res = segment_scene(
        scene,
        load_bench_model(model),
        out,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        device="cpu",
        nodata=0,
        formats=["gpkg"],
        quicklook=False,
        progress=False,
        block_size=block_size,
    )
    seconds = time.perf_counter() - t0
    rep = res.report
    return {
        "seconds": seconds,
        "megapixels": rep["scene"]["width"] * rep["scene"]["height"] / 1e6,
        "n_polygons": _count_features(res.outputs["gpkg"]),
        "timings_s": rep["timings_s"],
        "tiles": rep["tiles"],
    }


def run_torchgeo(
    scene: Path, model: Path, out: Path, *, tile: int, overlap: int, batch_size: int, block_size: int = 1024
) -> dict[str, Any]:
    """The TorchGeo recipe: RasterDataset + GriddedPatchSampler + DataLoader, numpy stitch,
    rasterio writes, ``rasterio.features.shapes`` + shapely polygons into a GeoPackage.

    Returns:
        seconds, megapixels, polygons and per-stage timings.
    """
    import numpy as np
    import rasterio
    import torch
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GriddedPatchSampler

    from benchmarks.common import load_bench_model, whole_array_polygons

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    # The same weights and normalisation as geovae: the user loads the module from the file.
    loaded = load_bench_model(model)
    # geovae runs its modules channels_last; a user's own nn.Module is in PyTorch's default
    # layout, so the loop gets that (docs/benchmarks.md says how much of the ratio this is).
    module = loaded.module.eval().to(memory_format=torch.contiguous_format)
    mean = torch.tensor(loaded.info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(loaded.info.std, dtype=torch.float32).view(1, -1, 1, 1)
    K = loaded.info.num_classes

    ds = RasterDataset(paths=[str(scene)])
    sampler = GriddedPatchSampler(ds, size=tile, stride=tile - overlap)
    loader = DataLoader(ds, sampler=sampler, batch_size=batch_size, collate_fn=stack_samples, num_workers=0)
    with rasterio.open(scene) as src:
        H, W, transform, crs = src.height, src.width, src.transform, src.crs
    left, top, res = transform.c, transform.f, transform.a
    # Full-scene accumulators: the usual way to average overlapping patch predictions.
    prob_sum = np.zeros((K, H, W), dtype=np.float32)
    count = np.zeros((H, W), dtype=np.float32)
    valid = np.zeros((H, W), dtype=bool)
    model_s = 0.0
    n_tiles = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            x = batch["image"]
            tm = time.perf_counter()
            probs = module((x - mean) / std).softmax(dim=1).numpy()
            model_s += time.perf_counter() - tm
            n_tiles += len(x)
            xs = x.numpy()
            for i, b in enumerate(batch["bounds"].tolist()):
                xmin, ymax = b[0], b[4]
                c0, r0 = round((xmin - left) / res), round((top - ymax) / res)
                # Patches can start before and run past the scene; keep the inside part.
                rr0, cc0 = max(r0, 0), max(c0, 0)
                rr1, cc1 = min(r0 + tile, H), min(c0 + tile, W)
                if rr1 <= rr0 or cc1 <= cc0:
                    continue
                ps = (slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0))
                prob_sum[:, rr0:rr1, cc0:cc1] += probs[i][(slice(None), *ps)]
                count[rr0:rr1, cc0:cc1] += 1
                # Landsat fill is 0 in every band (no nodata tag): the same rule as nodata=0.
                valid[rr0:rr1, cc0:cc1] |= (xs[i][(slice(None), *ps)] != 0).any(axis=0)
    timings["predict_s"] = time.perf_counter() - t0
    timings["model_s"] = model_s

    t0 = time.perf_counter()
    prob_sum /= np.maximum(count, 1)
    classes = prob_sum.argmax(axis=0).astype(np.uint8)
    confidence = prob_sum.max(axis=0)
    del prob_sum
    classes[~valid] = 255
    confidence[~valid] = np.nan
    out.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="GTiff",
        width=W,
        height=H,
        count=1,
        crs=crs,
        transform=transform,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        BIGTIFF="IF_SAFER",
    )
    stem = scene.stem
    with rasterio.open(out / f"{stem}.classes.tif", "w", dtype="uint8", nodata=255, **profile) as dst:
        dst.write(classes, 1)
    with rasterio.open(out / f"{stem}.confidence.tif", "w", dtype="float32", nodata=float("nan"), **profile) as dst:
        dst.write(confidence, 1)
    timings["rasters_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gdf = whole_array_polygons(classes, valid, transform, crs)
    gdf.to_file(out / f"{stem}.gpkg", driver="GPKG", layer="polygons", engine="pyogrio")
    timings["vectorize_s"] = time.perf_counter() - t0
    seconds = time.perf_counter() - t_start
    timings["total_s"] = seconds
    return {
        "seconds": seconds,
        "megapixels": H * W / 1e6,
        "n_polygons": len(gdf),
        "n_tiles": n_tiles,
        "sampler": "GriddedPatchSampler",
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def run_model_only(
    scene: Path, model: Path, out: Path, *, tile: int, overlap: int, batch_size: int, block_size: int = 1024
) -> dict[str, Any]:
    """The ceiling: forward passes only, on the tiles geovae runs, already in memory.

    Tiles come from the same grid in the blender's order (geovae.blend.BlockGrid), all-nodata tiles are skipped and
    nodata is filled with the band means, exactly as segment_scene does; reading them is
    not timed.

    Returns:
        seconds (forward passes only), megapixels of the scene, tiles run.
    """
    import numpy as np
    import torch

    from benchmarks.common import load_bench_model
    from geovae.blend import BlockGrid
    from geovae.scene import open_scene
    from geovae.tiling import TileGrid

    m = load_bench_model(model)
    sc = open_scene(scene, nodata=0)
    grid = TileGrid(sc.height, sc.width, tile, overlap, margin=m.info.halo)
    fill = np.asarray(m.info.mean, dtype=np.float32)[:, None]
    tiles = []
    order = list(BlockGrid(grid, block_size).order())
    for t in order:
        data, v = sc.read(t.window)
        if not v.any():
            continue
        data[:, ~v] = fill
        tiles.append(data)
    sc.close()
    batches = [torch.from_numpy(np.stack(tiles[i : i + batch_size])) for i in range(0, len(tiles), batch_size)]
    del tiles
    seconds = 0.0
    for x in batches:
        t0 = time.perf_counter()
        o = m.predict(x)
        o["probs"].float().cpu().numpy()  # as segment_scene does; a no-op copy on CPU
        seconds += time.perf_counter() - t0
    return {"seconds": seconds, "megapixels": sc.width * sc.height / 1e6, "n_tiles": sum(len(b) for b in batches)}


def worker(
    method: str,
    scene: Path,
    model: Path,
    out: Path,
    *,
    tile: int,
    overlap: int,
    batch_size: int,
    threads: int,
    block_size: int,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Run one worker in this process and return its JSON record (with peak RSS)."""
    _threads(threads)
    # Import what each side needs before the clock starts, so none pays import time; each
    # side imports only its own stack, so its peak RSS is what a user of it would see.
    # Both sides build a TorchGeo checkpoint's network with torchgeo.models (about 2 s of
    # imports on a quiet machine, several times that beside busy processes): not timed either.
    import geopandas  # noqa: F401
    import pyogrio  # noqa: F401
    import rasterio  # noqa: F401
    import torchgeo.models

    import geovae.model.io

    if method == "torchgeo":
        import torchgeo.datasets
        import torchgeo.samplers  # noqa: F401
    else:
        import geovae.segment
        import geovae.vector  # noqa: F401

    fn = {"geovae": run_geovae, "torchgeo": run_torchgeo, "model": run_model_only}[method]
    kw = dict(tile=tile, overlap=overlap, batch_size=batch_size, block_size=block_size)
    with common.metered() as meter:
        if profile is not None:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            rec = prof.runcall(fn, scene, model, out, **kw)
            prof.dump_stats(profile)
            pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(30)
        else:
            rec = fn(scene, model, out, **kw)
    rec.update(meter, method=method, threads=threads, tile=tile, overlap=overlap, batch_size=batch_size)
    return rec


def main() -> None:
    """Command line of one worker (the orchestration lives in ``python -m benchmarks``)."""
    import os

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=4, metavar=("METHOD", "SCENE", "MODEL", "OUT"), required=True)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--profile", type=Path, help="write cProfile stats here and print the top 30")
    p.add_argument("--helper-nice", type=int, help="geovae's helper threads' nice increment (geovae.cpu.HELPER_NICE)")
    a = p.parse_args()
    if a.helper_nice is not None:
        import geovae.cpu

        geovae.cpu.HELPER_NICE = a.helper_nice
    method, scene, model, out = a.worker
    if method not in WORKERS:
        p.error(f"METHOD must be one of {', '.join(WORKERS)}")
    rec = worker(
        method,
        Path(scene),
        Path(model),
        Path(out),
        tile=a.tile,
        overlap=a.overlap,
        batch_size=a.batch_size,
        threads=a.threads,
        block_size=a.block_size,
        profile=a.profile,
    )
    print(json.dumps(rec, default=str))


if __name__ == "__main__":
    main()
