"""Peak memory and pipeline overhead of ``segment_scene`` on scenes of increasing size.

The scenes are mosaics of the real Landsat-8 Parana scene (2041 x 1860 x 3 uint16): a VRT
(``benchmarks.common.mosaic_vrt``) tiles the scene over an N x N canvas, so a 20,000 x 20,000 scene
(2.4 GB of pixels) costs no disk. Each size runs in its own subprocess so that its peak RSS
(``ru_maxrss``) is its own. For each size it prints:

* peak RSS, and its ratio to the smallest size (bounded memory: stays near 1);
* pipeline wall time over the pure model time on the same number of tiles (batches of the
  same shape already on the device, no reading, blending or writing): the pipeline's overhead.

Usage::

    .venv/bin/python benchmarks/bench_memory.py                 # 2048, 8192, 20000
    .venv/bin/python benchmarks/bench_memory.py --sizes 1024,2048 --device cpu

Numbers are ratios within one run on one machine; the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEOVAE_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()
PARANA = DATA / "landsat8_parana" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


def build_model(device: str, base: int, depth: int, tile: int, kind: str = "vae"):  # type: ignore[no-untyped-def]
    """geovae's VAE segmenter with random weights (throughput does not depend on training),
    or with ``kind="tiny"`` one 1x1 convolution, to measure the pipeline's own memory and
    time at large sizes on a CPU."""
    import torch
    from torch import nn

    from geovae.model.base import ModelInfo, SegmentationModel
    from geovae.model.vae import VAESegmenter

    torch.manual_seed(0)
    if kind == "tiny":
        net = nn.Conv2d(3, 6, 1)
        depth = 0
    else:
        net = VAESegmenter(3, 6, base_channels=base, depth=depth)
    info = ModelInfo(in_channels=3, num_classes=6, mean=[9000.0] * 3, std=[2000.0] * 3, tile_size=tile, stride=2**depth)
    return SegmentationModel(net, info, device)


def pure_model_seconds(model, n_tiles: int, batch: int, tile: int, max_batches: int = 200) -> float:  # type: ignore[no-untyped-def]
    """Model time for ``n_tiles`` tiles: batches already on the device, no I/O (extrapolated
    from at most ``max_batches`` timed batches after a warm-up)."""
    import torch

    x = torch.rand(batch, 3, tile, tile, device=model.device) * 4000 + 7000
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    for _ in range(3):
        model.predict(x)
    sync()
    n_batches = max(1, -(-n_tiles // batch))
    timed = min(n_batches, max_batches)
    t0 = time.perf_counter()
    for _ in range(timed):
        model.predict(x)["probs"].float().cpu()  # the pipeline copies probabilities back too
    sync()
    return (time.perf_counter() - t0) * n_batches / timed


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))  # run as a script, the benchmarks package is not importable otherwise
    from benchmarks.common import mosaic_vrt
    from geovae.segment import segment_scene

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        vrt = mosaic_vrt(args.child, cache=Path(tmp))
        model = build_model(args.device, args.base, args.depth, args.tile, args.model)
        t0 = time.perf_counter()
        r = segment_scene(
            vrt,
            model,
            Path(tmp) / "out",
            batch_size=args.batch_size,
            nodata=0,
            formats=(),
            quicklook=False,
            progress=False,
            block_size=args.block_size,
        )
        wall = time.perf_counter() - t0
        pure = pure_model_seconds(model, r.report["tiles"]["tiles_run"], args.batch_size, args.tile)
        sizes = {k: os.path.getsize(v) for k, v in r.outputs.items() if k != "report"}
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "size": args.child,
                "peak_rss_mb": rss_mb,
                "wall_s": wall,
                "pure_model_s": pure,
                "timings": r.report["timings_s"],
                "tiles": r.report["tiles"],
                "device": str(model.device),
                "output_bytes": sizes,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2048,8192,20000", help="scene sides in pixels, comma-separated")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument(
        "--model",
        choices=("vae", "tiny"),
        default="vae",
        help="vae: geovae's VAE segmenter; tiny: a 1x1 convolution (pipeline cost alone)",
    )
    ap.add_argument("--base", type=int, default=16, help="VAE base channels")
    ap.add_argument("--depth", type=int, default=4, help="VAE depth (stride 2**depth)")
    ap.add_argument("--workdir", default=None, help="folder for the temporary outputs")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not PARANA.exists():
        sys.exit(f"real data not found: {PARANA} (set GEOVAE_TEST_DATA)")
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(size),
            "--device",
            args.device,
            "--tile",
            str(args.tile),
            "--batch-size",
            str(args.batch_size),
            "--block-size",
            str(args.block_size),
            "--base",
            str(args.base),
            "--depth",
            str(args.depth),
            "--model",
            args.model,
        ] + (["--workdir", args.workdir] if args.workdir else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"size {size} failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(res)
        base = results[0]["peak_rss_mb"]
        t = res["timings"]
        print(
            f"{size:>6} px  {size * size * 3 * 2 / 1e9:6.2f} GB pixels  peak RSS {res['peak_rss_mb']:8.0f} MB "
            f"(x{res['peak_rss_mb'] / base:4.2f} of the smallest)  wall {res['wall_s']:7.1f} s  "
            f"tiles {res['tiles']['tiles_run']}/{res['tiles']['tiles_total']}  "
            f"pipeline/pure-model {res['wall_s'] / res['pure_model_s']:5.2f}  "
            f"(predict loop/pure {t['predict_s'] / res['pure_model_s']:5.2f}, read {t.get('read_s', 0):.1f} s, "
            f"close+overviews {t['rasters_close_s']:.1f} s) on {res['device']}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
