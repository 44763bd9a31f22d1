"""What writing the rasters as Cloud Optimized GeoTIFFs costs, against the plain tiled GeoTIFFs.

Both sides write the same four rasters a segment run writes (classes uint8, confidence
float32, uncertainty 2 x float32, reconstruction error float32), block by block (1024 px
blocks, as the raster sink does) from values derived from a VRT mosaic of the real Landsat-8
Parana scene, under the GDAL block cache a run uses (64 MiB):

* **plain**: a tiled GeoTIFF at ZSTD's default level with the
  kind's predictor, then internal overviews built in place (``build_overviews``, mode for
  classes, average for the rest). ``rio cogeo validate`` rejects it: the overviews come
  after the image.
* **cog** (what geovae writes, :func:`geovae.sinks.rasters.write_cog`): the blocks go into a scratch GeoTIFF
  at ZSTD level 1, then GDAL's COG driver copies it into the output, building the overviews
  on the way; the scratch file is removed.

Each run is a subprocess of its own (its peak RSS is its own), the sides interleaved
(plain, cog, cog, plain, ...) within one invocation; the time is the raster stage only
(block writes plus overviews / COG copy), not the reading of the mosaic. It prints the
medians and the cog/plain ratios per size.

Usage::

    .venv/bin/python benchmarks/bench_cog.py                       # 2048 and 8192, 2 repeats
    .venv/bin/python benchmarks/bench_cog.py --sizes 2048,8192,20480 --repeats 1 --json cog.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("classes", "confidence", "uncertainty", "reconstruction_error")
BLOCK = 1024
CACHE_BYTES = 32 * 2**20  # geovae.segment.run.GDAL_CACHE_BYTES


def _values(data, valid):  # type: ignore[no-untyped-def]
    """Land-cover-like values of every kind from one block of the mosaic (3 x h x w uint16)."""
    import numpy as np

    b = data.astype(np.float32)
    bright = b.mean(0)
    conf = np.clip(bright / 20000.0, 0, 1).astype(np.float32)
    classes = (np.clip(bright / 4000.0, 0, 5)).astype(np.uint8) + (b[2] > b[1])
    ent = (1 - conf) * 1.7
    out = {
        "classes": np.where(valid, classes, 255).astype(np.uint8)[None],
        "confidence": np.where(valid, conf, np.nan).astype(np.float32)[None],
        "uncertainty": np.stack([np.where(valid, ent, np.nan), np.where(valid, ent * 0.01, np.nan)]).astype(np.float32),
        "reconstruction_error": np.where(valid, (b[0] - b[1]) ** 2 / 1e6, np.nan).astype(np.float32)[None],
    }
    return out


def child(side: str, size: int, workdir: Path) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from benchmarks.common import mosaic_vrt
    from geovae.products import raster_profile
    from geovae.scene import capped_gdal_cache
    from geovae.sinks.rasters import write_cog

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    vrt = mosaic_vrt(size)
    out = Path(tempfile.mkdtemp(dir=workdir))
    write_s = finish_s = 0.0
    with capped_gdal_cache(CACHE_BYTES), rasterio.open(vrt) as src:
        size_kw = dict(width=src.width, height=src.height, crs=src.crs, transform=src.transform)
        paths = {k: out / (f".{k}.scratch" if side == "cog" else f"{k}.tif") for k in KINDS}
        dsts = {
            k: rasterio.open(p, "w", **raster_profile(k, **size_kw, stream=side == "cog")) for k, p in paths.items()
        }
        for r in range(0, src.height, BLOCK):
            for c in range(0, src.width, BLOCK):
                win = Window(c, r, min(BLOCK, src.width - c), min(BLOCK, src.height - r))
                data = src.read(window=win)
                vals = _values(data, (data != 0).any(0))
                t0 = time.perf_counter()
                for k, ds in dsts.items():
                    ds.write(vals[k], window=win)
                write_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for ds in dsts.values():
            ds.close()
        for k, p in paths.items():
            if side == "cog":
                write_cog(p, out / f"{k}.tif", k)
                p.unlink()
            else:  # plain: the image, then its overviews built in place
                factors, f = [], 2
                while max(src.width, src.height) / f >= 128 and f <= 4096:
                    factors.append(f)
                    f *= 2
                with (
                    rasterio.Env(COMPRESS_OVERVIEW="ZSTD", GDAL_TIFF_OVR_BLOCKSIZE="256"),
                    rasterio.open(p, "r+") as ds,
                ):
                    ds.build_overviews(factors, Resampling.mode if k == "classes" else Resampling.average)
        finish_s = time.perf_counter() - t0
    from rio_cogeo.cogeo import cog_validate

    valid = all(cog_validate(str(out / f"{k}.tif"), quiet=True)[0] for k in KINDS)
    nbytes = sum((out / f"{k}.tif").stat().st_size for k in KINDS)
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    return {
        "side": side,
        "size": size,
        "write_s": write_s,
        "finish_s": finish_s,
        "raster_s": write_s + finish_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_imports_mib": rss_imports,
        "bytes": nbytes,
        "cog_valid": valid,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2048,8192", help="scene sides in pixels, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="folder for the temporary rasters")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.gettempdir())
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), workdir)))
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import require_data

    require_data()
    results: list[dict[str, float]] = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for rep in range(args.repeats):
            for side in ("plain", "cog") if rep % 2 == 0 else ("cog", "plain"):
                cmd = [sys.executable, __file__, "--child", side, str(size), "--workdir", str(workdir)]
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if p.returncode:
                    sys.exit(f"{side} {size} failed:\n{p.stderr[-3000:]}")
                res = json.loads(p.stdout.strip().splitlines()[-1])
                results.append(res)
                print(
                    f"{size:>6} px {side:>5}: raster stage {res['raster_s']:6.1f} s (writes {res['write_s']:5.1f} s, "
                    f"overviews/COG {res['finish_s']:5.1f} s), peak RSS {res['peak_rss_mib']:5.0f} MiB "
                    f"({res['peak_rss_mib'] - res['rss_imports_mib']:4.0f} above imports), "
                    f"{res['bytes'] / 2**20:7.1f} MiB, COG valid: {res['cog_valid']}",
                    flush=True,
                )
        med = {
            s: {
                k: statistics.median(r[k] for r in results if r["side"] == s and r["size"] == size)
                for k in ("raster_s", "write_s", "finish_s", "peak_rss_mib", "rss_imports_mib", "bytes")
            }
            for s in ("plain", "cog")
        }
        above = {s: med[s]["peak_rss_mib"] - med[s]["rss_imports_mib"] for s in med}
        print(
            f"{size:>6} px  cog/plain: time x{med['cog']['raster_s'] / med['plain']['raster_s']:.2f}, "
            f"peak RSS x{med['cog']['peak_rss_mib'] / med['plain']['peak_rss_mib']:.2f} "
            f"(above imports {above['cog']:.0f} vs {above['plain']:.0f} MiB), "
            f"size x{med['cog']['bytes'] / med['plain']['bytes']:.2f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
