"""Objects kept apart (``--objects``), measured on real data with the command line a user runs.

``parcels``: the Amsterdam Sentinel-2 NDVI scene (1000 x 1000, 10 m) with the Dutch crop-parcel
register (BRP 2020, 3,061 parcels, many sharing an edge or 1-2 px apart). The scene is cut in a
west half (columns 0-499) and an east half (500-999); a model is trained on the west half only
from the register's polygons with a one-pixel boundary class (``geovae train --vector-labels
--boundary-width 1``), the east half is segmented with ``--objects parcel``, and both the object
polygons and the plain class-region polygons of the same run are scored against the register
(``geovae evaluate --objects``: both sets clipped to the east half, one-to-one matches at IoU >=
0.5). The segment runs use the seed threshold and minimum object size that training chose on
its held-out part (the east quarter of the west half), unless ``--seed-threshold`` is given;
the result records them (``settings``, ``learnt``). Then the east half is segmented again with another tile and block size, and the
objects of the two runs are compared (count, IoU of each object with its counterpart).

``buildings``: the same protocol (train on the west half, judge the east half) on the
SpaceNet-4 Atlanta tile (WorldView panchromatic, 900 x 900, 0.5 m) with its 43 building
footprints as the object labels.

``spacenet``: the SpaceNet-4 Atlanta tile's 43 building footprints, as objects from the
reference-derived building mask (``geovae vectorize --objects``, no probabilities: seeds by
distance), scored against the footprints.

Every step is a ``geovae`` subprocess (the commands are printed), so the numbers are those of
the command line. Run from the repository root::

    .venv/bin/python benchmarks/bench_objects.py parcels --epochs 40 --json /tmp/objects.json
    .venv/bin/python benchmarks/bench_objects.py spacenet --json /tmp/objects.json

Data: Sentinel-2 (Copernicus, "contains modified Copernicus Sentinel data 2020"), BRP parcels
(CC0), SpaceNet (CC BY-SA 4.0); see ``../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEOVAE_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()
NDVI = DATA / "ndvi_parcels_amsterdam" / "NDVI.tif"
REGISTER = DATA / "ndvi_parcels_amsterdam" / "parcels_brp2020.gpkg"
ATLANTA_MASK = DATA / "spacenet_solaris" / "atlanta_sn4_building_mask_georef.tif"
FOOTPRINTS = DATA / "spacenet_solaris" / "original" / "geotiff_labels.geojson"
ATLANTA = DATA / "spacenet_solaris" / "original" / "sample_geotiff.tif"
#: The sets the train-west / judge-east protocol runs on: image, reference objects, object class.
SETS = {"parcels": (NDVI, REGISTER, "parcel"), "buildings": (ATLANTA, FOOTPRINTS, "building")}


def geovae(*args: Any) -> str:
    """Run ``python -m geovae ARGS`` (this checkout's package), echo the command, return stdout."""
    cmd = [sys.executable, "-m", "geovae", *map(str, args)]
    print("$ geovae " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def crop(src_path: Path, out: Path, col0: int, col1: int) -> Path:
    import rasterio

    with rasterio.open(src_path) as src:
        win = rasterio.windows.Window(col0, 0, col1 - col0, src.height)
        profile = src.profile | {
            "width": col1 - col0,
            "transform": src.window_transform(win),
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
        }
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(src.read(window=win))
    return out


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """Objects of two runs of one scene: counts, and the IoU of each object of ``a`` with the
    object of ``b`` of the same ``object_id`` (1 - identical)."""
    import geopandas as gpd
    import shapely

    ga = gpd.read_file(a, layer=Path(a).name[: -len(".gpkg")].replace(".objects", "_objects")).set_index("object_id")
    gb = gpd.read_file(b, layer=Path(b).name[: -len(".gpkg")].replace(".objects", "_objects")).set_index("object_id")
    common = ga.index.intersection(gb.index)
    x, y = ga.loc[common].geometry.values, gb.loc[common].geometry.values
    iou = shapely.area(shapely.intersection(x, y)) / shapely.area(shapely.union(x, y))
    return {
        "objects_a": len(ga),
        "objects_b": len(gb),
        "same_id": len(common),
        "iou_min": float(iou.min()) if len(iou) else None,
        "share_iou_ge_0.99": float((iou >= 0.99).mean()) if len(iou) else None,
        "identical": int(shapely.equals(x, y).sum()),
    }


def parcels(args: argparse.Namespace) -> dict[str, Any]:
    import geopandas as gpd
    import rasterio

    image, register, kind = SETS[args.what]
    work = Path(args.work or tempfile.mkdtemp(prefix="geovae-bench-objects-"))
    work.mkdir(parents=True, exist_ok=True)
    with rasterio.open(image) as src:
        half = src.width // 2
        west, east = crop(image, work / "west.tif", 0, half), crop(image, work / "east.tif", half, src.width)
    labels = work / "parcels.gpkg"
    reg = gpd.read_file(register)
    reg.assign(kind=kind)[["kind", "geometry"]].to_file(labels, layer="parcels")
    model = Path(args.model) if args.model else work / "parcels.safetensors"
    if not args.model:
        geovae(
            "-q",
            "train",
            "--image",
            west,
            "--vector-labels",
            labels,
            "--label-field",
            "kind",
            "--boundary-width",
            args.boundary_width,
            "--epochs",
            args.epochs,
            "--tile",
            args.tile,
            "--batch-size",
            args.batch_size,
            "--seed",
            args.seed,
            *(["--object-weight", args.object_weight] if args.object_weight is not None else []),
            "--device",
            "cpu",
            "--out",
            model,
        )
    res: dict[str, Any] = {
        "model": str(model),
        "seed": args.seed,
        "epochs": args.epochs,
        "boundary_width": args.boundary_width,
        "tile": args.tile,
        "batch_size": args.batch_size,
        "object_weight": args.object_weight,
    }
    # Run b: another tile and block size; the overlap stays the default, which covers the
    # model's halo, so the probabilities are the same and the objects must be too.
    runs = {"a": [], "b": ["--tile", 128, "--block-size", 256]}
    for name, extra in runs.items():
        geovae(
            "-q",
            "segment",
            east,
            "-m",
            model,
            "-o",
            work / f"out-{name}",
            "--objects",
            kind,
            *(["--object-seed", args.seed_threshold] if args.seed_threshold is not None else []),
            "--formats",
            "gpkg",
            "--no-quicklook",
            "--device",
            "cpu",
            *extra,
        )
    classes = work / "out-a" / "east.classes.tif"
    # The seed and minimum object size the runs used, and where they came from (option, model, default).
    report = json.loads((work / "out-a" / "east.json").read_text())["objects"]
    res["settings"] = {k: report.get(k) for k in ("seed", "min_area", "settings_from")}
    from geovae.model.io import read_model_info

    res["learnt"] = read_model_info(model).extra.get("objects", {})
    res["objects"] = json.loads(geovae("evaluate", classes, "--objects", register, "--json"))["objects"]
    res["class_regions"] = json.loads(
        geovae(
            "evaluate",
            classes,
            "--objects",
            register,
            "--predicted-objects",
            work / "out-a" / "east.gpkg",
            "--object-classes",
            kind,
            "--json",
        )
    )["objects"]
    res["tiling"] = compare_runs(work / "out-a" / "east.objects.gpkg", work / "out-b" / "east.objects.gpkg")
    res["errors"] = merges_and_splits(work / "out-a" / "east.objects.gpkg", register, east)
    o, r = res["objects"], res["class_regions"]
    print(
        f"objects:       F1 {num(o['f1'])}  P {num(o['precision'])}  R {num(o['recall'])}  mean IoU {num(o['mean_iou'])}"
        f"  ({o['matched']} of {o['predicted']} predicted, {o['reference']} reference)"
    )
    print(
        f"class regions: F1 {num(r['f1'])}  P {num(r['precision'])}  R {num(r['recall'])}  ({r['predicted']} polygons)"
    )
    print(f"errors: {res['errors']}")
    print(f"tiling: {res['tiling']}")
    return res


def spacenet(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work or tempfile.mkdtemp(prefix="geovae-bench-objects-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "atlanta.objects.gpkg"
    geovae("vectorize", ATLANTA_MASK, "--objects", 1, "-o", out, "--block-size", 128)
    res = {}
    for iou in (0.5, 0.75, 0.9):
        res[f"iou_{iou}"] = json.loads(
            geovae(
                "evaluate",
                ATLANTA_MASK,
                "--objects",
                FOOTPRINTS,
                "--predicted-objects",
                out,
                "--object-iou",
                iou,
                "--json",
            )
        )["objects"]
        o = res[f"iou_{iou}"]
        print(
            f"IoU >= {iou}: F1 {o['f1']:.3f} ({o['matched']} of {o['predicted']} predicted, {o['reference']} "
            f"reference), mean IoU {o['mean_iou']:.3f}"
        )
    return res


def num(v: float | None) -> str:
    """A score to 3 decimals, or - where it is undefined (no object predicted or matched)."""
    return "-" if v is None else f"{v:.3f}"


def merges_and_splits(objects: Path, register: Path, scene: Path) -> dict[str, int]:
    """How the predicted objects err, both sets clipped to ``scene``'s bounds: ``merges``, the
    objects that hold the larger part (> 50 %) of two or more parcels; ``splits``, the parcels
    that hold the larger part of two or more objects."""
    import geopandas as gpd
    import numpy as np
    import rasterio
    import shapely

    with rasterio.open(scene) as src:
        box = shapely.box(*src.bounds)
    pred = gpd.read_file(objects, layer=Path(objects).name[: -len(".gpkg")].replace(".objects", "_objects"))
    ref = gpd.read_file(register).to_crs(pred.crs)
    p = shapely.intersection(np.asarray(pred.geometry.values), box)
    r = shapely.make_valid(shapely.intersection(np.asarray(ref.geometry.values), box))
    p, r = p[shapely.area(p) > 0], r[shapely.area(r) > 0]
    pi, ri = shapely.STRtree(r).query(p, predicate="intersects")
    inter = shapely.area(shapely.intersection(p[pi], r[ri]))
    most_of_parcel = inter > 0.5 * shapely.area(r[ri])
    most_of_object = inter > 0.5 * shapely.area(p[pi])
    merges = np.bincount(pi[most_of_parcel], minlength=len(p))
    splits = np.bincount(ri[most_of_object], minlength=len(r))
    return {"merges": int((merges >= 2).sum()), "splits": int((splits >= 2).sum())}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (sample standard deviation) over seeds of the parcels runs' scores."""
    import statistics

    out: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
    values = {
        "f1": [r["objects"]["f1"] or 0.0 for r in rows],
        "precision": [r["objects"]["precision"] or 0.0 for r in rows],
        "recall": [r["objects"]["recall"] or 0.0 for r in rows],
        "merges": [r["errors"]["merges"] for r in rows],
        "splits": [r["errors"]["splits"] for r in rows],
        "class_regions_f1": [r["class_regions"]["f1"] or 0.0 for r in rows],
    }
    for k, v in values.items():
        out[k] = {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["parcels", "buildings", "spacenet"])
    ap.add_argument("--work", help="Folder for the crops, model and outputs (default: a new temporary one).")
    ap.add_argument("--model", help="Skip training: segment with this model file.")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--boundary-width", type=int, default=1)
    ap.add_argument("--tile", type=int, default=64, help="geovae train --tile (the recorded runs use 64).")
    ap.add_argument("--batch-size", type=int, default=16, help="geovae train --batch-size.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", help="parcels: train one model per seed (e.g. 0,1,2) and print the mean and spread.")
    ap.add_argument(
        "--object-weight",
        type=float,
        help="geovae train --object-weight (default: train's, 1; 0: a model without object heads).",
    )
    ap.add_argument(
        "--seed-threshold",
        type=float,
        help="--object-seed of the segment runs (default: the model's learnt value, else 0.5).",
    )
    ap.add_argument("--json", help="Append the result as one JSON line to this file.")
    args = ap.parse_args()
    if args.what in SETS and args.seeds:
        rows = []
        base = Path(args.work or tempfile.mkdtemp(prefix="geovae-bench-objects-"))
        for seed in (int(v) for v in args.seeds.split(",")):
            one = argparse.Namespace(**{**vars(args), "seed": seed, "work": str(base / f"seed{seed}")})
            rows.append(parcels(one))
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"what": args.what, **rows[-1]}) + "\n")
        s = summary(rows)
        for k in ("f1", "precision", "recall", "merges", "splits", "class_regions_f1"):
            print(f"{k}: {s[k]['mean']:.3f} ± {s[k]['sd']:.3f}  ({', '.join(f'{v:.3f}' for v in s[k]['values'])})")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"what": f"{args.what}-summary", "epochs": args.epochs, **s}) + "\n")
        return
    res = {"what": args.what, **(parcels(args) if args.what in SETS else spacenet(args))}
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
