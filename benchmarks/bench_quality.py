"""Quality on real data: the VAE segmenter vs TorchGeo's U-Net on the NC Landsat-7 scene.

Train on the west half, test on the east half against the full 1996 land-class map
(``nc_landclass96_label_uint8.tif``), with the same budget for every model:

* the same TorchGeo data pipeline (``SceneDataModule``: ``RandomGeoSampler`` patches from
  the west half, seeded), tile, batch size, patches per epoch, epochs, learning rate,
  optimiser (AdamW), scene-wide band normalisation and inverse-sqrt class weights;
* no validation during training and no model selection: the last weights are scored;
* 3 seeds (weights, patch sampling and latent noise), reported as mean +- std.

Settings:

(a) ``full``: every west-half pixel of the land-class map is a label.
(b) ``sparse``: only the 34 hand-drawn training polygons (``nc_training_polygons_label_uint8.tif``,
    1,428 labelled pixels in the west half). The semi-supervised VAE also gets the whole scene
    as unlabelled data (one unlabelled batch per step); the U-Net sees the labelled stream only.

Models:

* ``vae``: geovae's ``VAESegmentationTask`` (base_channels 32, depth 4, latent 8: the defaults).
* ``unet``: TorchGeo's own ``SemanticSegmentation`` task, ``model="unet"``,
  ``backbone="resnet18"``, ``weights=None``; subclassed only to get the same normalisation and
  to ignore labels under image nodata, as the VAE task does. It has about 30x the VAE's
  parameters but a similar cost per training step on a CPU.

Metrics, over east-half pixels where the image is valid and the land-class map has a class:
mIoU over the classes present there, overall accuracy, and expected calibration error
(torchmetrics ``MulticlassCalibrationError``, 15 bins, L1). The VAE is scored at the latent
mean (what ``geovae segment`` does by default) and with the mean of 8 latent samples.

Run (about 25 CPU minutes for everything with the defaults; the two settings can run in
two processes)::

    .venv/bin/python benchmarks/bench_quality.py --settings full --json /tmp/q_full.jsonl
    .venv/bin/python benchmarks/bench_quality.py --settings sparse --json /tmp/q_sparse.jsonl
    .venv/bin/python benchmarks/bench_quality.py --table /tmp/q_full.jsonl /tmp/q_sparse.jsonl

Data: GRASS GIS North Carolina sample dataset (CC BY-SA 3.0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEOVAE_TEST_DATA", ROOT.parent / "shared" / "data")).resolve() / "nc_landsat7_landclass96"
IMAGE = DATA / "nc_lsat7_2000_6band_uint8.tif"
FULL = DATA / "nc_landclass96_label_uint8.tif"
SPARSE = DATA / "nc_training_polygons_label_uint8.tif"
CLASSES = "1:developed,2:agriculture,3:herbaceous,4:shrubland,5:forest,6:water,7:sediment"


def _setup_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def make_unet_task(mean: list[float], std: list[float], nodata: float, class_weights: list[float], lr: float) -> Any:
    """TorchGeo's SemanticSegmentation U-Net, fed the same normalised input as the VAE."""
    import torch
    from torchgeo.tasks import SemanticSegmentation

    from geovae.training.transforms import IGNORE_INDEX, merge_batches

    class NormalisedUNet(SemanticSegmentation):
        def __init__(self, band_mean: list[float], band_std: list[float], nodata: float, **kw: Any) -> None:
            super().__init__(**kw)
            self.register_buffer("band_mean", torch.tensor(band_mean).view(1, -1, 1, 1))
            self.register_buffer("band_std", torch.tensor(band_std).view(1, -1, 1, 1))
            self.nodata = nodata

        def _norm(self, batch: Any) -> dict[str, Any]:
            batch = dict(merge_batches(batch))
            x = batch["image"].float()
            miss = x == self.nodata
            valid = ~miss.all(1)
            batch["image"] = torch.where(miss, torch.zeros_like(x), (x - self.band_mean) / self.band_std)
            batch["mask"] = torch.where(valid, batch["mask"], torch.full_like(batch["mask"], IGNORE_INDEX))
            return batch

        def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            return super().training_step(self._norm(batch), batch_idx, dataloader_idx)

        def configure_optimizers(self) -> Any:
            # The same optimiser as the VAE task (AdamW, no schedule change within the budget).
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=self.hparams["patience"])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss"}}

    return NormalisedUNet(mean, std, nodata, model="unet", backbone="resnet18", weights=None, in_channels=6,
                          num_classes=7, labels=CLASSES.split(","), ignore_index=IGNORE_INDEX, loss="ce",
                          class_weights=class_weights, lr=lr)


def scene_inputs(mean: list[float], std: list[float]) -> tuple[Any, np.ndarray, np.ndarray, slice]:
    """The whole scene normalised and padded, the reference labels, the valid mask, the east slice."""
    import rasterio
    import torch

    with rasterio.open(IMAGE) as s:
        img = s.read().astype(np.float32)
    with rasterio.open(FULL) as s:
        ref = s.read(1)
    x = torch.from_numpy(img)[None]
    miss = x == 0
    xn = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    xn = torch.where(miss, torch.zeros_like(xn), xn)
    h, w = img.shape[1:]
    xn = torch.nn.functional.pad(xn, (0, (-w) % 32, 0, (-h) % 32))  # zeros = the band means
    valid = ~(img == 0).all(0)
    # The same split as SceneDataModule(val_fraction=0.5): the east half of the columns.
    k = round(w * 0.5)
    return xn, ref, valid, slice(w - k, w)


def score(probs: np.ndarray, ref: np.ndarray, valid: np.ndarray, east: slice) -> dict[str, Any]:
    """mIoU (classes present), OA and ECE on the east half."""
    import torch
    from torchmetrics.classification import MulticlassCalibrationError

    p = probs[:, :, east]
    r = ref[:, east]
    ok = valid[:, east] & (r > 0)
    pred = p.argmax(0)[ok] + 1
    truth = r[ok].astype(np.int64)
    ious = {}
    for c in np.unique(truth):
        inter = np.sum((pred == c) & (truth == c))
        union = np.sum((pred == c) | (truth == c))
        ious[int(c)] = float(inter / union)
    pk = torch.from_numpy(p[:, ok].T.copy())
    ece = MulticlassCalibrationError(num_classes=p.shape[0], n_bins=15, norm="l1")(pk, torch.from_numpy(truth - 1))
    return {"mIoU": float(np.mean(list(ious.values()))), "OA": float(np.mean(pred == truth)), "ECE": float(ece),
            "IoU": ious, "pixels": int(ok.sum())}


def run_one(setting: str, model: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model on one setting with one seed and score it on the east half."""
    import lightning.pytorch as pl
    import torch

    from geovae.bands import band_statistics
    from geovae.training import SceneDataModule, VAESegmentationTask
    from geovae.training.fit import _fit
    from geovae.training.task import balanced_class_weights

    pl.seed_everything(seed, workers=True, verbose=False)
    labels = FULL if setting == "full" else SPARSE
    unlabeled = [str(IMAGE)] if (setting == "sparse" and model == "vae" and not args.no_unlabeled) else []
    dm = SceneDataModule(str(IMAGE), str(labels), classes=CLASSES, unlabeled=unlabeled, tile=args.tile,
                         batch_size=args.batch_size, val_fraction=0.5, val_side="east",
                         samples_per_epoch=args.samples_per_epoch, seed=seed, sampler=args.sampler)
    _stats = band_statistics(str(IMAGE))
    mean, std = _stats.mean, _stats.std
    cw = balanced_class_weights(dm.train_class_counts)
    steps_per_epoch = dm.length // dm.batch_size
    if model == "vae":
        task: Any = VAESegmentationTask(
            6, 7, labels=dm.classes.names, class_ids=dm.classes.ids, mean=mean, std=std, nodata=0.0,
            base_channels=args.base_channels, depth=args.depth, latent_channels=args.latent_channels, lr=args.lr,
            beta=args.beta, free_bits=args.free_bits, kl_warmup_steps=steps_per_epoch, class_weights=cw,
            recon_weight=args.recon_weight, recon_condition=args.recon_condition,
        )
        net = task.model
    else:
        task = make_unet_task(mean, std, 0.0, cw, args.lr)
        net = task.model
    params = sum(p.numel() for p in net.parameters())
    t0 = time.perf_counter()
    history, final = _fit(task, dm, trainer_kwargs={"max_epochs": args.epochs, "accelerator": "cpu", "devices": 1,
                                                    "precision": "32-true"}, has_val=False)
    seconds = time.perf_counter() - t0

    xn, ref, valid, east = scene_inputs(mean, std)
    h, w = ref.shape
    net.eval()
    out: dict[str, Any] = {"setting": setting, "model": model, "seed": seed, "params": params,
                           "train_seconds": round(seconds, 1), "steps": steps_per_epoch * args.epochs,
                           "final_train_loss": final.get("train_loss")}
    with torch.inference_mode():
        logits = net(xn)[0, :, :h, :w]
        out["eval"] = score(logits.softmax(0).numpy(), ref, valid, east)
        if model == "vae":
            torch.manual_seed(seed)
            probs = net.sample(xn, 8).mean(0)[0, :, :h, :w]
            out["eval_samples8"] = score(probs.numpy(), ref, valid, east)
            out["final_kl"] = final.get("train_kl")
            # How much the latent samples differ (a collapse monitor): mean total-variation
            # distance of each sample to their mean, and the mean mutual information (nats).
            from geovae.model.base import entropy
            from geovae.model.losses import sample_diversity

            torch.manual_seed(seed)
            sp = net.sample(xn, 8)[:, :, :, :h, :w]
            out["diversity"] = float(sample_diversity(sp))
            out["mean_mi"] = float((entropy(sp.mean(0), 1) - torch.stack([entropy(q, 1) for q in sp]).mean(0)).mean())
            out["final_recon"] = final.get("train_recon")
    return out


def _ms(vals: list[float], digits: int = 3) -> str:
    a = np.array(vals, dtype=float)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: mean +- std over seeds per setting and model."""
    lines = ["| setting | model | params | mIoU | OA | ECE | train s/run | seeds |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["model"]), []).append(r)
    order = [("full", "vae"), ("full", "unet"), ("sparse", "vae"), ("sparse", "unet")]
    names = {"vae": "VAE segmenter (latent mean)", "unet": "TorchGeo U-Net (resnet18)"}
    for key in order + [k for k in groups if k not in order]:
        if key not in groups:
            continue
        g = groups[key]
        label = names.get(key[1], key[1])
        if key == ("sparse", "vae"):
            label = "semi-supervised VAE (latent mean)"
        lines.append(f"| {key[0]} | {label} | {g[0]['params']:,} | {_ms([r['eval']['mIoU'] for r in g])} | "
                     f"{_ms([r['eval']['OA'] for r in g])} | {_ms([r['eval']['ECE'] for r in g])} | "
                     f"{np.mean([r['train_seconds'] for r in g]):.0f} | {len(g)} |")
        if key[1] == "vae" and all("eval_samples8" in r for r in g):
            lines.append(f"| {key[0]} | {label.replace('latent mean', 'mean of 8 samples')} | | "
                         f"{_ms([r['eval_samples8']['mIoU'] for r in g])} | {_ms([r['eval_samples8']['OA'] for r in g])} | "
                         f"{_ms([r['eval_samples8']['ECE'] for r in g])} | | {len(g)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["full", "sparse"], choices=["full", "sparse"])
    ap.add_argument("--models", nargs="+", default=["vae", "unet"], choices=["vae", "unet"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples-per-epoch", type=int, default=128)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--base-channels", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--latent-channels", type=int, default=8)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--free-bits", type=float, default=0.05)
    ap.add_argument("--recon-weight", type=float, default=1.0)
    ap.add_argument("--recon-condition", default="class", choices=["class", "none"],
                    help="reconstruction given z and the class (semi-supervised VAE) or z alone")
    ap.add_argument("--sampler", default="random", choices=["random", "labelled"],
                    help="training patches (both models): anywhere, or each holding labels")
    ap.add_argument("--no-unlabeled", action="store_true", help="sparse VAE without the unlabelled scene (ablation)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--json", type=Path, help="append one JSON line per run here")
    ap.add_argument("--table", type=Path, nargs="+", help="only print the table of these JSON-lines files")
    args = ap.parse_args(argv)

    if args.table:
        rows = [json.loads(line) for f in args.table for line in f.read_text().splitlines() if line.strip()]
        print(table(rows))
        return 0
    if not IMAGE.exists():
        print(f"real data not found: {IMAGE} (set GEOVAE_TEST_DATA)", file=sys.stderr)
        return 1
    _setup_torch(args.threads)
    import logging

    # An entry point: Lightning's INFO banners would drown the results table.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    budget = {k: getattr(args, k) for k in ("epochs", "samples_per_epoch", "tile", "batch_size", "lr", "threads",
                                            "sampler")}
    rows = []
    for setting in args.settings:
        for seed in args.seeds:
            for model in args.models:
                r = run_one(setting, model, seed, args)
                r["budget"] = budget
                r["vae_arch"] = {k: getattr(args, k) for k in ("base_channels", "depth", "latent_channels", "beta",
                                                                "free_bits", "recon_weight", "recon_condition")}
                rows.append(r)
                e = r["eval"]
                print(f"{setting:6s} {model:4s} seed {seed}: mIoU {e['mIoU']:.3f} OA {e['OA']:.3f} "
                      f"ECE {e['ECE']:.3f} ({r['train_seconds']:.0f} s)", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
    print(table(rows))
    return 0 if all(math.isfinite(r["eval"]["mIoU"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
