"""Vectorising speed and memory: geovae's block-wise vectoriser vs the whole-array recipe.

The class raster is derived from the real Landsat-8 Parana scene (B2-B4 brightness in five
quantile classes, split again where red exceeds green, sieved to 8 px, fill = nodata 255),
tiled N x N times to make larger scenes. Each method runs in its own subprocess (so peak RSS
is its own), the runs are interleaved (A B A B ...) so machine noise hits both alike, and
the report gives medians and ratios, never absolute targets.

The baseline is the recipe from rasterio's documentation: read the whole band, call
``rasterio.features.shapes`` on it, build shapely polygons, compute areas and write a
GeoPackage with pyogrio. geovae does the same job block by block and writes the same
GeoPackage (same attributes except the means, which need a confidence raster).

Usage::

    .venv/bin/python benchmarks/bench_vectorize.py [--tiles 1 2] [--repeats 3] [--block-size 1024]
        [--format gpkg|geojson|parquet] [--json results.json] [--before DIR]

``--format geojson|parquet`` writes that format instead of a GeoPackage (every method).
``--json`` writes the runs and the summary as JSON (the printed table keeps its format:
``python -m benchmarks`` parses it). ``--before DIR`` adds a third method, ``before``:
geovae imported from another checkout (e.g. ``git worktree add /tmp/old HEAD~3``),
interleaved with the other two, to measure a change before and after in one run.
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
DATA = Path(os.environ.get("GEOVAE_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()
PARANA = DATA / "landsat8_parana" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


def make_class_raster(path: Path, tiles: int) -> tuple[int, int]:
    """Write the Parana-derived class raster, tiled ``tiles`` x ``tiles``; return (w, h)."""
    import numpy as np
    import rasterio
    import rasterio.features

    with rasterio.open(PARANA) as src:
        bands = src.read().astype(np.float32)
        profile = src.profile
    valid = bands[0] > 0  # 0 is Landsat fill (the file has no nodata tag)
    b2, b3, b4 = bands
    bright = (b2 + b3 + b4) / 3
    classes = np.digitize(bright, np.quantile(bright[valid], [0.2, 0.4, 0.6, 0.8])).astype(np.uint8)
    classes = np.where(b4 > 1.05 * b3, classes + 5, classes).astype(np.uint8)
    classes = rasterio.features.sieve(classes, 8, mask=valid)
    classes[~valid] = 255
    # Mirror alternate copies so regions continue across the seams like a real mosaic would.
    row = np.concatenate([classes if i % 2 == 0 else classes[:, ::-1] for i in range(tiles)], axis=1)
    mosaic = np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(tiles)], axis=0)
    h, w = mosaic.shape
    profile.update(
        count=1,
        dtype="uint8",
        nodata=255,
        width=w,
        height=h,
        compress="deflate",
        tiled=True,
        blockxsize=512,
        blockysize=512,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mosaic, 1)
    return w, h


def run_geovae(raster: Path, out: Path, block_size: int) -> int:
    try:
        from geovae.vector import vectorize
    except ImportError:  # a --before checkout from before the package was made
        try:
            from geovae.polygons import vectorize  # type: ignore[no-redef]
        except ImportError:  # ... or from before the module was renamed
            from geovae.vectorize import vectorize  # type: ignore[no-redef]

    return vectorize(raster, out, block_size=block_size).n_polygons


def run_baseline(raster: Path, out: Path, block_size: int) -> int:
    import pyogrio
    import rasterio

    from benchmarks.common import whole_array_polygons

    with rasterio.open(raster) as src:
        classes = src.read(1)
        valid = src.read_masks(1) > 0
        transform, crs = src.transform, src.crs
    gdf = whole_array_polygons(classes, valid, transform, crs)
    if out.suffix == ".geojson":
        pyogrio.write_dataframe(gdf.to_crs(4326), out, driver="GeoJSON", layer_options={"RFC7946": "YES"})
    elif out.suffix == ".parquet":
        gdf.to_parquet(out, index=False)
    else:
        pyogrio.write_dataframe(gdf, out, driver="GPKG", layer="polygons")
    return len(gdf)


def worker(method: str, raster: Path, out: Path, block_size: int) -> None:
    """Run one method in this process; print one JSON line with time, count and peak RSS."""
    # Run as a script: make ``benchmarks.common`` importable, after any --before checkout.
    sys.path.append(str(ROOT))
    # Import what both methods use before timing, so neither pays import time.
    import geopandas  # noqa: F401
    import pyogrio  # noqa: F401
    import rasterio  # noqa: F401
    import shapely  # noqa: F401

    import geovae

    try:
        import geovae.vector
    except ImportError:  # a --before checkout from before the package was made
        try:
            import geovae.polygons
        except ImportError:  # ... or from before the module was renamed
            import geovae.vectorize

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    n = (run_geovae if method == "geovae" else run_baseline)(raster, out, block_size)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    print(
        json.dumps(
            {
                "method": method,
                "seconds": seconds,
                "n_polygons": n,
                "peak_rss_mb": peak,
                "rss_after_imports_mb": rss0,
                "geovae": str(Path(geovae.__file__).parents[1]),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 2], help="mosaic sizes (N x N scenes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="also run geovae imported from checkout DIR (method 'before'), interleaved",
    )
    parser.add_argument(
        "--format",
        choices=["gpkg", "geojson", "parquet"],
        default="gpkg",
        help="polygon output format, the same for every method",
    )
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "RASTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, raster, out = args.worker
        worker(method, Path(raster), Path(out), args.block_size)
        return
    if not PARANA.exists():
        sys.exit(f"real data not found: {PARANA} (set GEOVAE_TEST_DATA to the shared data folder)")

    if args.before is not None and not any(
        (args.before / "geovae" / f).exists() for f in ("vector", "polygons.py", "vectorize.py")
    ):
        sys.exit(f"--before {args.before}: no geovae/vector there; pass a checkout of this repository")

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, block size {args.block_size}, output .{args.format}"
    )
    methods = ["geovae", "baseline"] + (["before"] if args.before else [])
    report: dict = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "block_size": args.block_size,
        "format": args.format,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "before": str(args.before.resolve()) if args.before else None,
        "scenes": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_vectorize_") as tmp:
        for tiles in args.tiles:
            raster = Path(tmp) / f"parana_classes_{tiles}x{tiles}.tif"
            w, h = make_class_raster(raster, tiles)
            mpx = w * h / 1e6
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            for r in range(args.repeats):
                for method in methods if r % 2 == 0 else methods[::-1]:
                    out = Path(tmp) / f"{method}_{tiles}_{r}.{args.format}"
                    env = None
                    if method == "before":  # the other checkout's geovae comes first on the path
                        env = dict(
                            os.environ,
                            PYTHONPATH=os.pathsep.join(
                                [str(args.before.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]
                            ),
                        )
                    cmd = [
                        sys.executable,
                        __file__,
                        "--block-size",
                        str(args.block_size),
                        "--worker",
                        "geovae" if method == "before" else method,
                        str(raster),
                        str(out),
                    ]
                    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                    runs[method].append(json.loads(res.stdout.strip().splitlines()[-1]))
                    out.unlink(missing_ok=True)
            print(f"\nscene {tiles}x{tiles} Parana mosaic: {w} x {h} px = {mpx:.1f} MP")
            summary = {}
            scene: dict = {"tiles": tiles, "width": w, "height": h, "megapixels": mpx, "methods": {}}
            for method, rs in runs.items():
                sec = statistics.median(x["seconds"] for x in rs)
                n = rs[0]["n_polygons"]
                rss = max(x["peak_rss_mb"] for x in rs)
                base = statistics.median(x["rss_after_imports_mb"] for x in rs)
                summary[method] = (sec, n, rss, base)
                print(
                    f"  {method:8s} {sec:7.2f} s  {mpx / sec:6.2f} MP/s  {n / sec:8.0f} polygons/s  "
                    f"{n:7d} polygons  peak RSS {rss:7.0f} MiB (after imports {base:.0f} MiB)"
                )
                scene["methods"][method] = {
                    "seconds_median": sec,
                    "seconds": [x["seconds"] for x in rs],
                    "mp_per_s": mpx / sec,
                    "polygons_per_s": n / sec,
                    "n_polygons": n,
                    "peak_rss_mib": rss,
                    "rss_after_imports_mib": base,
                    "rss_above_imports_mib": rss - base,
                    "geovae": rs[0]["geovae"],
                }
            (gs, gn, grss, gbase), (bs, bn, brss, bbase) = summary["geovae"], summary["baseline"]
            print(
                f"  ratio geovae/baseline: speed x{bs / gs:.2f}, peak RSS x{grss / brss:.2f}, "
                f"RSS above imports x{(grss - gbase) / max(brss - bbase, 1e-9):.2f}"
            )
            scene["ratios"] = {
                "geovae_over_baseline": {
                    "speed": bs / gs,
                    "peak_rss": grss / brss,
                    "rss_above_imports": (grss - gbase) / max(brss - bbase, 1e-9),
                }
            }
            if "before" in summary:
                ps, _, prss, pbase = summary["before"]
                print(
                    f"  ratio before/baseline: speed x{bs / ps:.2f}, peak RSS x{prss / brss:.2f}, "
                    f"RSS above imports x{(prss - pbase) / max(brss - bbase, 1e-9):.2f}; "
                    f"geovae/before: speed x{ps / gs:.2f}"
                )
                scene["ratios"]["before_over_baseline"] = {
                    "speed": bs / ps,
                    "peak_rss": prss / brss,
                    "rss_above_imports": (prss - pbase) / max(brss - bbase, 1e-9),
                }
                scene["ratios"]["geovae_over_before"] = {"speed": ps / gs}
            scene["same_polygon_count"] = all(v[1] == gn for v in summary.values())
            if gn != bn:
                print(f"  WARNING: polygon counts differ (geovae {gn}, baseline {bn}): block joining is wrong")
            else:
                print("  same polygon count: no region is cut by a block line")
            report["scenes"].append(scene)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
