"""Segment many scenes on a Dask cluster: a local one, or any scheduler.

    python examples/batch_dask.py [--scenes a.tif b.tif ... | --folder scenes/] [--model model.safetensors]
        [--scheduler tcp://host:8786] [--workers 2] [--out runs/]

Each scene's outputs go to ``OUT/<scene>/``; ``OUT/manifest.csv`` records every scene, a re-run
skips finished ones, and ``OUT/catalog.json`` / ``OUT/collection.json`` are a STAC catalog
over the scenes' Items. Without scenes, the NC scene is cut into its west and east halves
to make two; without a model, one is trained first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def halves(scene: Path, folder: Path) -> list[Path]:
    """Two real scenes from one: its west and east halves, each a GeoTIFF of its own."""
    import rasterio
    from rasterio.windows import Window

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with rasterio.open(scene) as src:
        w = src.width // 2
        for name, win in (("west", Window(0, 0, w, src.height)), ("east", Window(w, 0, src.width - w, src.height))):
            p = folder / f"{scene.stem}_{name}.tif"
            prof = src.profile | {
                "width": int(win.width),
                "height": int(win.height),
                "transform": src.window_transform(win),
            }
            with rasterio.open(p, "w", **prof) as dst:
                dst.write(src.read(window=win))
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", nargs="*", default=[])
    ap.add_argument("--folder", help="a folder of scenes")
    ap.add_argument("--model")
    ap.add_argument("--scheduler", help="a Dask scheduler address; default: a LocalCluster")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    ap.add_argument("--data", help="the real-data folder (default $GEOVAE_DATA or ../shared/data)")
    ap.add_argument("--out", default="geovae-example-batch")
    a = ap.parse_args(argv)
    import pystac

    import geovae
    from geovae.batch import expand_scenes

    out = Path(a.out)
    scene, labels = _common.nc_scene_and_labels(a.data, out / "data")
    scenes = expand_scenes([*a.scenes, *([a.folder] if a.folder else [])]) or halves(scene, out / "scenes")
    model = Path(a.model) if a.model else _common.quick_model(scene, labels, out / "model.safetensors")
    res = geovae.run_batch(
        scenes,
        model,
        out / "runs",
        scheduler=a.scheduler,
        workers=None if a.scheduler else a.workers,
        progress=not _common.FAST,
        **{k: v for k, v in _common.segment_settings().items() if k != "progress"},
    )
    print(f"done {res.done}, skipped {res.skipped}, failed {res.failed}; manifest {res.manifest}")
    collection = pystac.Collection.from_file(str(res.collection))
    print("STAC collection", collection.id, "items", [ln.href for ln in collection.links if ln.rel == "item"])
    return {"result": res, "collection": collection}


if __name__ == "__main__":
    main()
