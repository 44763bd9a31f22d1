"""Distributed scaling: scenes per minute of ``run_batch`` on a LocalCluster of 1 and 2 workers.

The scenes are real: rasterio's RGB and RGBA test scenes, the SpaceNet Albers scene and
512 x 512 windows of the Landsat-8 Parana scene (as VRT files in a temporary folder that
point at the shared data; nothing is copied). The model is the benchmarks' Parana-trained
VAE segmenter (``common.benchmark_model``). Each run is a fresh ``run_batch`` call, cluster
start included (a user pays it too), with ``resume=False`` into a fresh folder; runs with 1
and 2 workers are interleaved (1 2 1 2 ...) so machine noise hits both alike, and the report
gives medians and the ratio, never an absolute target.

Usage::

    .venv/bin/python benchmarks/bench_distributed.py [--quick] [--repeats 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402


def window_vrt(src: Path, dst: Path, col: int, row: int, size: int) -> Path:
    """A VRT of a ``size`` x ``size`` window of ``src`` (keeps georeferencing; copies no pixels)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(src) as ds:
        t = ds.window_transform(Window(col, row, size, size))
        bands = []
        for b in range(1, ds.count + 1):
            bands.append(
                f'<VRTRasterBand dataType="{ {"uint16": "UInt16", "uint8": "Byte", "int16": "Int16"}[ds.dtypes[b - 1]] }" band="{b}">'
                f'<SimpleSource><SourceFilename relativeToVRT="0">{common._xml_escape(str(src))}</SourceFilename>'
                f'<SourceBand>{b}</SourceBand><SrcRect xOff="{col}" yOff="{row}" xSize="{size}" ySize="{size}"/>'
                f'<DstRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/></SimpleSource></VRTRasterBand>'
            )
        xml = (
            f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{common._xml_escape(ds.crs.to_wkt())}</SRS>'
            f"<GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>{''.join(bands)}</VRTDataset>"
        )
    dst.write_text(xml)
    return dst


def real_scenes(work: Path, n_windows: int) -> list[Path]:
    """The 3-band real scenes of the shared data, plus ``n_windows`` Parana windows."""
    d = common.DATA
    scenes = [
        d / "rasterio_testdata" / "RGB.byte.tif",
        d / "rasterio_testdata" / "RGBA.byte.tif",
        d / "spacenet_solaris" / "original" / "sample_geotiff_custom_proj.tif",
    ]
    for k in range(n_windows):
        col, row = 300 + 512 * (k % 3), 200 + 512 * (k // 3 % 3)
        scenes.append(window_vrt(common.PARANA, work / f"parana_{col}_{row}.vrt", col, row, 512))
    return scenes


def run_once(scenes: list[Path], model: Path, workers: int, out: Path, opts: dict[str, Any]) -> float:
    """Seconds for one complete ``run_batch`` (cluster start to last manifest write)."""
    from geovae.batch import run_batch

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = run_batch(scenes, model, out, workers=workers, resume=False, progress=False, **opts)
    dt = time.perf_counter() - t0
    if res.failed or res.done != len(scenes):
        raise SystemExit(f"benchmark batch failed: {[(r.scene, r.error) for r in res.rows if r.error]}")
    return dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer scenes, one repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--windows", type=int, default=5, help="Parana windows added to the 3 small real scenes")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    common.require_data()
    repeats, windows = (1, 1) if a.quick else (a.repeats, a.windows)
    model = common.benchmark_model(base_channels=8)
    opts = {"tile": a.tile, "batch_size": 4, "device": "cpu"}
    with tempfile.TemporaryDirectory(prefix="geovae-bench-dist-") as tmp:
        work = Path(tmp)
        scenes = real_scenes(work, windows)
        times: dict[int, list[float]] = {1: [], 2: []}
        for n in [w for _ in range(repeats) for w in (1, 2)]:
            times[n].append(run_once(scenes, model, n, work / f"out{n}", opts))
    med = {n: statistics.median(v) for n, v in times.items()}
    spm = {n: 60.0 * len(scenes) / med[n] for n in med}
    result = {
        "machine": common.machine_info(),
        # Other jobs on a shared machine take cores from the workers; the ratio means little above ~1.
        "load_average_1m_after": os.getloadavg()[0],
        "scenes": [s.name for s in scenes],
        "options": opts,
        "repeats": repeats,
        "seconds": times,
        "scenes_per_minute": spm,
        "ratio_2_over_1": spm[2] / spm[1],
    }
    print(f"distributed scaling: {len(scenes)} real scenes, tile {a.tile}, {repeats} repeat(s), {os.cpu_count()} cores")
    for n in (1, 2):
        print(f"  {n} worker(s): {spm[n]:6.1f} scenes/min  (median {med[n]:.1f} s per batch)")
    print(
        f"  ratio 2/1 workers: x{result['ratio_2_over_1']:.2f}  (load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores: other jobs take cores from the workers)"
    )
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
