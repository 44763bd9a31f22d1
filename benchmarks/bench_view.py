"""The viewer on a large output: time per tile and polygon request, and the server's memory.

Builds a segment-like output folder from the real Landsat-8 Parana scene (the class raster of
``bench_vectorize.make_class_raster``: brightness quantiles split where red exceeds green,
sieved, mirrored into an N x N mosaic; N = 5 gives about 10k x 9k pixels and 430k polygons),
with a colour table, class names and overviews as ``geovae segment`` writes them, a
confidence raster, the polygons as a GeoPackage (``geovae.vector.vectorize``) and a report. Then it
starts ``geovae view`` in a subprocess and measures from a client on the same machine:

* tiles of the class and confidence rasters at zooms from the whole mosaic to beyond 1:1;
* the polygons of a 1280 x 800 px view at several zooms (features, bytes, time);
* the polygon under a point;
* the server's RSS after start-up, after all requests, and its peak (VmHWM).

Usage::

    .venv/bin/python benchmarks/bench_view.py [--tiles 5] [--requests 40] [--json results.json] [--keep DIR]

The folder is built under a temporary directory (or ``--keep DIR``, reused when present),
never in the repository. Times are wall-clock on a shared machine: medians and 95th
percentiles of many requests, one request at a time.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_vectorize import PARANA, make_class_raster  # noqa: E402

NAMES = [
    "darkest",
    "dark",
    "mid",
    "bright",
    "brightest",
    "darkest, red",
    "dark, red",
    "mid, red",
    "bright, red",
    "brightest, red",
]


def build(folder: Path, tiles: int) -> dict[str, Any]:
    """Write the output folder; return what was built (sizes, polygon count, seconds)."""
    import numpy as np
    import rasterio
    from rasterio.enums import Resampling

    from geovae.vector import vectorize

    folder.mkdir(parents=True, exist_ok=True)
    classes = folder / "mosaic.classes.tif"
    confidence = folder / "mosaic.confidence.tif"
    gpkg = folder / "mosaic.gpkg"
    t0 = time.perf_counter()
    w, h = make_class_raster(classes, tiles)
    colours = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ]
    with rasterio.open(classes, "r+") as ds:
        ds.write_colormap(1, dict(enumerate(colours)))
        ds.update_tags(
            CLASSES=json.dumps(
                [{"id": i, "name": n, "color": c} for i, (n, c) in enumerate(zip(NAMES, colours, strict=True))]
            ),
            **{f"CLASS_{i}": n for i, n in enumerate(NAMES)},
        )
        ds.build_overviews([2, 4, 8, 16, 32], Resampling.nearest)
        prof = ds.profile
        counts = np.zeros(256, np.int64)
        prof.update(dtype="float32", nodata=float("nan"))
        with rasterio.open(confidence, "w", **prof) as dst:
            for _, win in ds.block_windows(1):
                c = ds.read(1, window=win)
                counts += np.bincount(c.ravel(), minlength=256)
                # a stand-in confidence: lower near class edges, as a real model's is
                edge = np.zeros(c.shape, bool)
                edge[1:] |= c[1:] != c[:-1]
                edge[:, 1:] |= c[:, 1:] != c[:, :-1]
                conf = np.where(edge, 0.55, 0.9).astype("float32") - (c % 5) * 0.05
                dst.write(np.where(c == 255, np.nan, conf).astype("float32"), 1, window=win)
            dst.build_overviews([2, 4, 8, 16, 32], Resampling.nearest)
        pixel_area = abs(ds.transform.a * ds.transform.e)
    raster_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = vectorize(classes, [gpkg], confidence=confidence, class_names=dict(enumerate(NAMES)))
    vector_s = time.perf_counter() - t0
    total = counts[:255].sum()
    report = {
        "scene": {"path": None},
        "model": {"class_ids": list(range(10)), "class_names": NAMES},
        "area_unit": "m2 (planar, in the projected CRS)",
        "classes": [
            {
                "id": i,
                "name": n,
                "pixels": int(counts[i]),
                "area": float(counts[i] * pixel_area),
                "fraction": float(counts[i] / total),
            }
            for i, n in enumerate(NAMES)
        ],
        "outputs": {"classes": classes.name, "confidence": confidence.name, "gpkg": gpkg.name, "report": "mosaic.json"},
    }
    (folder / "mosaic.json").write_text(json.dumps(report))
    info = {
        "width": w,
        "height": h,
        "polygons": res.n_polygons,
        "rasters_s": raster_s,
        "vectorize_s": vector_s,
        "gpkg_mib": gpkg.stat().st_size / 2**20,
    }
    (folder / "built.json").write_text(json.dumps(info))
    return info


def _status(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


class Client:
    """One keep-alive connection, as a browser's; gzip accepted as a browser does."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, path: str) -> tuple[float, int, bytes]:
        t0 = time.perf_counter()
        self.conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
        r = self.conn.getresponse()
        body = r.read()
        dt = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {body[:200]!r}")
        return dt, len(body), body


def _tile(lon: float, lat: float, z: int) -> tuple[int, int]:
    n = 2**z
    return int((lon + 180) / 360 * n), int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)


def _stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"n": len(ms), "median_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))]}


def measure(folder: Path, requests: int) -> dict[str, Any]:
    """Start the viewer on ``folder`` and time requests against it."""
    import numpy as np

    p = subprocess.Popen(
        [sys.executable, "-m", "geovae", "view", str(folder), "--no-browser"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = p.stdout.readline().split()[2]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        c = Client(port)
        t_start, _, body = c.get("/api/catalog")
        scene = json.loads(body)["scenes"][0]
        w, s, e, n = scene["bounds"]
        _, _, body = c.get("/api/s0/scene")
        time.sleep(1.0)  # the warm-up thread finishes the styles
        out: dict[str, Any] = {"rss_start_mib": _status(p.pid)["VmRSS"]}
        lat0 = (s + n) / 2
        # zoom where the whole mosaic fits a 1280 px wide view, and the raster's own zoom
        fit = math.floor(math.log2(1280 / 256 * 360 / (e - w)))
        native = math.floor(math.log2(2 * math.pi * 6378137 * math.cos(math.radians(lat0)) / (256 * 30.0)))
        rng = np.random.default_rng(0)
        tiles: dict[str, Any] = {}
        for kind in ("classes", "confidence"):
            for z in range(fit, native + 2):
                x0, y0 = _tile(w, n, z)
                x1, y1 = _tile(e, s, z)
                times = []
                for _ in range(requests):
                    x, y = int(rng.integers(x0, x1 + 1)), int(rng.integers(y0, y1 + 1))
                    dt, size, png = c.get(f"/tiles/s0/{kind}/{z}/{x}/{y}.png")
                    assert png[:4] == b"\x89PNG"
                    times.append(dt * 1000)
                tiles[f"{kind} z{z}"] = _stats(times)
        out["tiles"] = tiles
        out["rss_after_tiles_mib"] = _status(p.pid)["VmRSS"]
        views = {}
        for z in range(fit, native + 2):
            # a 1280 x 800 px view at zoom z, centred on random points of the mosaic
            span_lon = 1280 / 256 * 360 / 2**z
            span_lat = span_lon * 800 / 1280 * math.cos(math.radians(lat0))
            times, feats, sizes, truncated = [], [], [], 0
            for _ in range(max(3, requests // 4)):
                cx, cy = rng.uniform(w, e), rng.uniform(s, n)
                bbox = f"{cx - span_lon / 2},{cy - span_lat / 2},{cx + span_lon / 2},{cy + span_lat / 2}"
                dt, size, body = c.get(f"/api/s0/polygons?bbox={bbox}&z={z}")
                fc = json.loads(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)
                times.append(dt * 1000)
                feats.append(len(fc["features"]))
                sizes.append(size / 1024)
                truncated += bool(fc["truncated"])
            views[f"z{z}"] = {
                **_stats(times),
                "features_median": statistics.median(feats),
                "kib_gzip_median": statistics.median(sizes),
                "truncated": truncated,
            }
        out["polygon_views"] = views
        times = []
        for _ in range(requests):
            dt, _, _ = c.get(f"/api/s0/at?lon={rng.uniform(w, e)}&lat={rng.uniform(s, n)}&z={native}")
            times.append(dt * 1000)
        out["polygon_at"] = _stats(times)
        st = _status(p.pid)
        out["rss_end_mib"], out["rss_peak_mib"] = st["VmRSS"], st["VmHWM"]
        out["first_catalog_ms"] = t_start * 1000
        return out
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=5, help="mosaic of N x N Parana scenes (5: ~430k polygons)")
    parser.add_argument("--requests", type=int, default=40, help="requests per zoom level and kind")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the output folder here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    a = parser.parse_args()
    if not PARANA.exists():
        sys.exit(f"real data not found: {PARANA} (set GEOVAE_TEST_DATA to the shared data folder)")
    with tempfile.TemporaryDirectory(prefix="geovae-bench-view-") as tmp:
        folder = a.keep or Path(tmp) / "out"
        if (folder / "built.json").exists():
            built = json.loads((folder / "built.json").read_text())
        else:
            print(f"building a {a.tiles}x{a.tiles} Parana mosaic output in {folder} ...", file=sys.stderr)
            built = build(folder, a.tiles)
        print(
            f"output: {built['width']} x {built['height']} px, {built['polygons']:,} polygons, "
            f"GPKG {built['gpkg_mib']:.0f} MiB (rasters {built['rasters_s']:.0f} s, vectorise {built['vectorize_s']:.0f} s)"
        )
        res = measure(folder, a.requests)
    print(
        f"server RSS: {res['rss_start_mib']:.0f} MiB after start, {res['rss_after_tiles_mib']:.0f} after tiles, "
        f"{res['rss_end_mib']:.0f} at the end, peak {res['rss_peak_mib']:.0f}"
    )
    print("tiles (ms):")
    for k, v in res["tiles"].items():
        print(f"  {k:16s} median {v['median_ms']:6.1f}  p95 {v['p95_ms']:6.1f}  (n={v['n']})")
    print("polygons of a 1280x800 view:")
    for k, v in res["polygon_views"].items():
        print(
            f"  {k:4s} median {v['median_ms']:7.1f} ms  p95 {v['p95_ms']:7.1f} ms  {v['features_median']:6.0f} features  "
            f"{v['kib_gzip_median']:7.1f} KiB gzip  truncated {v['truncated']}/{v['n']}"
        )
    v = res["polygon_at"]
    print(f"polygon under a point: median {v['median_ms']:.1f} ms, p95 {v['p95_ms']:.1f} ms")
    if a.json:
        a.json.write_text(json.dumps({"built": built, **res}, indent=2))


if __name__ == "__main__":
    main()
