"""The trust check on real scenes: is a scene the model cannot read refused or flagged?

Two models per seed, each trained briefly with ``geovae.training.train_model`` (the model file
then records its training quantiles and reconstruction error, as every ``geovae train`` does):

* **NC**: the Landsat-7 NC scene with its 1996 land-class map (7 classes). Measured: the
  flagged fraction on its own training scene; whether a Landsat-8 scene (Gulf coast, 6 bands,
  uint16) and the NC scene scaled x257 to uint16 are refused; with ``force``, their flagged
  fraction.
* **Gulf coast**: the cloudy Landsat-8 Gulf-coast scene, trained on its clear pixels only
  (pixels whose pre-collection BQA cloud confidence is above "low" are nodata in the training
  copy, and the two classes are the BQA's own water / not-water flags). Measured on the whole,
  cloudy scene: the AUROC of the per-pixel anomaly score (the reconstruction-error raster)
  for separating BQA high-confidence cloud from clear pixels, and the flagged fraction on
  clear pixels, on cloud pixels and on the scene; and on the NC scene (another sensor) with
  ``force``.

Usage::

    .venv/bin/python benchmarks/bench_trust.py [--seeds 0 1 2] [--epochs 4] [--json out.json]

Prints a Markdown table of mean ± std over the seeds (docs/quality.md records it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import DATA  # noqa: E402

NC = DATA / "nc_landsat7_landclass96" / "nc_lsat7_2000_6band_uint8.tif"
NC_LABELS = DATA / "nc_landsat7_landclass96" / "nc_landclass96_label_uint8.tif"
GULF = DATA / "landsat8_gulfcoast" / "l8_stack_B2-B7_30m.tif"
GULF_BQA = DATA / "landsat8_gulfcoast" / "l8_BQA.tif"


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half (rank formula)."""
    from scipy.stats import rankdata

    s = np.concatenate([pos, neg])
    r = rankdata(s)
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _gulf_training_data(work: Path) -> tuple[Path, Path, np.ndarray]:
    """The Gulf-coast scene with cloudy pixels set to nodata, its water labels, the BQA cloud field."""
    import rasterio

    with rasterio.open(GULF_BQA) as q:
        bqa = q.read(1)
    cloud = (bqa >> 14) & 3  # pre-collection BQA: bits 14-15 cloud confidence
    water = (bqa >> 4) & 3  # bits 4-5 water confidence
    clear = cloud == 1
    with rasterio.open(GULF) as src:
        prof = src.profile | {"nodata": 0}
        data = src.read()
    image = work / "gulf_clear.tif"
    with rasterio.open(image, "w", **prof) as dst:
        dst.write(np.where(clear[None], data, 0).astype(data.dtype))
    labels = work / "gulf_water.tif"
    lab = np.where(clear, np.where(water >= 2, 2, 1), 0).astype("uint8")
    with rasterio.open(labels, "w", **(prof | {"count": 1, "dtype": "uint8"})) as dst:
        dst.write(lab, 1)
    return image, labels, cloud


def _run(scene: Path, model: Path, out: Path, **kw: Any) -> Any:
    from geovae.segment import segment_scene

    return segment_scene(scene, model, out, formats=(), quicklook=False, progress=False, **kw)


def one_seed(seed: int, epochs: int, work: Path) -> dict[str, Any]:
    import rasterio
    import torch

    from geovae.errors import ModelMismatchError
    from geovae.training import train_model

    torch.set_num_threads(1)
    rec: dict[str, Any] = {"seed": seed}
    small = dict(
        epochs=epochs, tile=64, batch_size=16, base_channels=16, depth=3, latent_channels=4, progress=False, seed=seed
    )
    # -- NC ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    nc_model = train_model(NC, NC_LABELS, work / f"nc_{seed}.safetensors", **small).model_path
    rec["nc_train_s"] = time.perf_counter() - t0
    r = _run(NC, nc_model, work / f"nc_out_{seed}")
    rec["nc_flagged_training_scene"] = r.report["trust"]["anomaly"]["fraction"]
    x257 = work / "nc_x257.tif"
    if not x257.exists():
        with rasterio.open(NC) as s, rasterio.open(x257, "w", **(s.profile | {"dtype": "uint16"})) as d:
            d.write(s.read().astype("uint16") * 257)
    for name, scene in (("gulf", GULF), ("nc_x257", x257)):
        try:
            _run(scene, nc_model, work / f"refused_{name}_{seed}")
            rec[f"nc_model_refuses_{name}"] = False
        except ModelMismatchError:
            rec[f"nc_model_refuses_{name}"] = True
        r = _run(scene, nc_model, work / f"forced_{name}_{seed}", force=True)
        rec[f"nc_model_forced_{name}_flagged"] = r.report["trust"]["anomaly"]["fraction"]
    # -- Gulf coast, trained on its clear pixels ------------------------------------------------------
    image, labels, cloud = _gulf_training_data(work)
    t0 = time.perf_counter()
    gulf_model = train_model(
        image, labels, work / f"gulf_{seed}.safetensors", classes="1:land,2:water", **small
    ).model_path
    rec["gulf_train_s"] = time.perf_counter() - t0
    r = _run(GULF, gulf_model, work / f"gulf_out_{seed}")
    with rasterio.open(r.outputs["reconstruction_error"]) as ds:
        err = ds.read(1)
    thr = r.report["trust"]["anomaly"]["threshold"]
    ok = np.isfinite(err)
    high, medium, clear = ok & (cloud == 3), ok & (cloud == 2), ok & (cloud == 1)
    rec["gulf_auroc_cloud_vs_clear"] = _auroc(err[high], err[clear])
    rec["gulf_auroc_medium_cloud_vs_clear"] = _auroc(err[medium], err[clear])
    rec["gulf_flagged_clear"] = float((err[clear] > thr).mean())
    rec["gulf_flagged_high_cloud"] = float((err[high] > thr).mean())
    rec["gulf_flagged_scene"] = r.report["trust"]["anomaly"]["fraction"]
    try:
        _run(NC, gulf_model, work / f"gulf_on_nc_{seed}")
        rec["gulf_model_refuses_nc"] = False
    except ModelMismatchError:
        rec["gulf_model_refuses_nc"] = True
    r = _run(NC, gulf_model, work / f"gulf_on_nc_forced_{seed}", force=True)
    rec["gulf_model_forced_nc_flagged"] = r.report["trust"]["anomaly"]["fraction"]
    return rec


def table(recs: list[dict[str, Any]]) -> str:
    keys = [k for k in recs[0] if k != "seed"]
    lines = ["| measure | mean ± std over seeds " + " ".join(str(r["seed"]) for r in recs) + " |", "| --- | --- |"]
    for k in keys:
        vals = [r[k] for r in recs]
        if isinstance(vals[0], bool):
            lines.append(f"| {k} | {sum(vals)}/{len(vals)} |")
        else:
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            lines.append(f"| {k} | {statistics.mean(vals):.4f} ± {sd:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    for p in (NC, NC_LABELS, GULF, GULF_BQA):
        if not p.exists():
            sys.exit(f"real data not found: {p} (set GEOVAE_TEST_DATA to the shared data folder)")
    recs = []
    with tempfile.TemporaryDirectory(prefix="geovae-trust-") as tmp:
        for seed in a.seeds:
            rec = one_seed(seed, a.epochs, Path(tmp))
            print(json.dumps(rec), flush=True)
            recs.append(rec)
    if a.json:
        a.json.write_text(json.dumps(recs, indent=1))
    print(table(recs))


if __name__ == "__main__":
    main()
