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

* ``vae``: geovae's ``VAESegmentationTask`` (base_channels 16, depth 3, latent 8, low-rank head:
  the training defaults; ``--base-channels 32 --depth 4 --head mlp`` gives the larger MLP-head model).
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
GULF = DATA.parent / "landsat8_gulfcoast"
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

    return NormalisedUNet(
        mean,
        std,
        nodata,
        model="unet",
        backbone="resnet18",
        weights=None,
        in_channels=6,
        num_classes=7,
        labels=CLASSES.split(","),
        ignore_index=IGNORE_INDEX,
        loss="ce",
        class_weights=class_weights,
        lr=lr,
    )


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
    return {
        "mIoU": float(np.mean(list(ious.values()))),
        "OA": float(np.mean(pred == truth)),
        "ECE": float(ece),
        "IoU": ious,
        "pixels": int(ok.sum()),
    }


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Exact AUROC of ``score`` for ``positive`` (ties count half), by ranks."""
    from scipy.stats import rankdata

    pos = positive.astype(bool)
    n_p, n_n = int(pos.sum()), int((~pos).sum())
    if n_p == 0 or n_n == 0:
        return float("nan")
    r = rankdata(score.astype(np.float64))
    return float((r[pos].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def _entropy_np(p: np.ndarray, axis: int = 0) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis)


def predict_full(net: Any, xn: Any, samples: int, seed: int, h: int, w: int) -> dict[str, np.ndarray]:
    """Mean probabilities, predictive entropy, mutual information and reconstruction error
    of one untiled pass (``infer``: the encoder runs once), cropped to the scene."""
    import torch

    with torch.inference_mode():
        torch.manual_seed(seed)
        logits, rec, _ = net.infer(xn, samples=samples, reconstruction=True)
        if logits.ndim == 5:
            p = logits.float().softmax(2)[:, 0, :, :h, :w]
            mean = p.mean(0)
            ent_s = -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean(0)
        else:
            mean = logits.float().softmax(1)[0, :, :h, :w]
            ent_s = None
        err = ((rec.float() - xn) ** 2).mean(1)[0, :h, :w]
    mean_np = mean.numpy()
    ent = _entropy_np(mean_np)
    mi = ent - ent_s.numpy() if ent_s is not None else np.zeros_like(ent)
    return {"probs": mean_np, "entropy": ent, "mi": np.clip(mi, 0.0, None), "recon": err.numpy()}


def reconstruction_sharpness(
    net: Any, xn: Any, mean: list[float], std: list[float], valid: np.ndarray, h: int, w: int
) -> dict[str, float]:
    """PSNR of the reconstruction (at the latent mean) in the image's 8-bit units, and the ratio of
    its gradient energy (sum of squared neighbour differences) to the input's: 1 is as sharp as
    the input, a blurry reconstruction is well below 1."""
    import torch

    with torch.inference_mode():
        rec = net.reconstruct(xn)[0, :, :h, :w].float().numpy()
    x = xn[0, :, :h, :w].numpy()
    m = np.asarray(mean, np.float32)[:, None, None]
    sd = np.asarray(std, np.float32)[:, None, None]
    rec_dn, x_dn = rec * sd + m, x * sd + m
    mse = float(((rec_dn - x_dn) ** 2)[:, valid].mean())
    ok_x = valid[:, 1:] & valid[:, :-1]
    ok_y = valid[1:] & valid[:-1]

    def energy(a: np.ndarray) -> float:
        return float((np.diff(a, axis=2) ** 2)[:, ok_x].sum() + (np.diff(a, axis=1) ** 2)[:, ok_y].sum())

    return {"psnr": 10 * math.log10(255.0**2 / max(mse, 1e-12)), "gradient_energy_ratio": energy(rec) / energy(x)}


def score_uncertainty(pr: dict[str, np.ndarray], ref: np.ndarray, valid: np.ndarray, east: slice) -> dict[str, Any]:
    """Accuracy, calibration and the AUROC of each uncertainty output for the errors."""
    out = score(pr["probs"], ref, valid, east)
    r = ref[:, east]
    ok = valid[:, east] & (r > 0)
    wrong = (pr["probs"][:, :, east].argmax(0) + 1)[ok] != r[ok]
    for k in ("entropy", "mi", "recon"):
        out[f"auroc_{k}"] = auroc(pr[k][:, east][ok], wrong)
    out["error_rate"] = float(wrong.mean())
    return out


def ood_scores(
    pr: dict[str, np.ndarray], ref: np.ndarray, valid: np.ndarray, east: slice, gulf: dict[str, np.ndarray] | None
) -> dict[str, float]:
    """Mean MI / entropy / reconstruction error on familiar and unfamiliar pixels."""
    w = ref.shape[1]
    west = slice(0, east.start)
    out: dict[str, float] = {}
    masks = {
        "nc_west": valid[:, west] & (ref[:, west] > 0),
        "nc_east_developed": valid[:, east] & (ref[:, east] == 1),
        "nc_east_other": valid[:, east] & (ref[:, east] > 1),
    }
    for name, m in masks.items():
        part = west if name == "nc_west" else east
        for k in ("mi", "entropy", "recon"):
            out[f"{k}_{name}"] = float(pr[k][:, part][m].mean())
    if gulf is not None:
        for name in ("clear", "cloud"):
            m = gulf["mask_" + name]
            for k in ("mi", "entropy", "recon"):
                out[f"{k}_gulf_{name}"] = float(gulf[k][m].mean())
    del w
    return out


def gulf_inputs() -> tuple[Any, np.ndarray, np.ndarray, int, int] | None:
    """The cloudy Gulf-coast Landsat-8 scene (B2-B7 = the NC model's six bands), normalised with
    its own clear-pixel statistics (the NC model's uint8 statistics do not apply to uint16
    reflectance), and its BQA high-confidence cloud and clear masks."""
    import rasterio
    import torch

    if not (GULF / "l8_stack_B2-B7_30m.tif").exists():
        return None
    with rasterio.open(GULF / "l8_stack_B2-B7_30m.tif") as s:
        img = s.read().astype(np.float32)
    with rasterio.open(GULF / "l8_BQA.tif") as s:
        conf = (s.read(1) >> 14) & 3
    clear, cloud = conf == 1, conf == 3
    m = img[:, clear].mean(1)
    sd = img[:, clear].std(1)
    xn = torch.from_numpy((img - m[:, None, None]) / sd[:, None, None])[None]
    h, w = img.shape[1:]
    xn = torch.nn.functional.pad(xn, (0, (-w) % 32, 0, (-h) % 32))
    return xn, clear, cloud, h, w


def run_one(setting: str, model: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model on one setting with one seed and score it on the east half."""
    import lightning.pytorch as pl
    import torch

    from geovae.bands import band_statistics
    from geovae.training import SceneDataModule, VAESegmentationTask
    from geovae.training.arguments import balanced_class_weights
    from geovae.training.fit import _fit

    pl.seed_everything(seed, workers=True, verbose=False)
    labels = FULL if setting == "full" else SPARSE
    unlabeled = [str(IMAGE)] if (setting == "sparse" and model == "vae" and not args.no_unlabeled) else []
    if setting == "full" and args.full_unlabeled and model == "vae":
        unlabeled = [str(IMAGE)]
    dm = SceneDataModule(
        str(IMAGE),
        str(labels),
        classes=CLASSES,
        unlabeled=unlabeled,
        tile=args.tile,
        batch_size=args.batch_size,
        val_fraction=0.5,
        val_side="east",
        samples_per_epoch=args.samples_per_epoch,
        seed=seed,
        sampler=args.sampler,
    )
    _stats = band_statistics(str(IMAGE))
    mean, std = _stats.mean, _stats.std
    cw = balanced_class_weights(dm.train_class_counts) if args.class_weighting else None
    steps_per_epoch = dm.length // dm.batch_size
    if model == "vae":
        task: Any = VAESegmentationTask(
            6,
            7,
            labels=dm.classes.names,
            class_ids=dm.classes.ids,
            mean=mean,
            std=std,
            nodata=0.0,
            **vae_arguments(args),
            kl_warmup_steps=steps_per_epoch,
            class_weights=cw,
        )
        net = task.model
    else:
        task = make_unet_task(mean, std, 0.0, cw, args.lr)
        net = task.model
    params = sum(p.numel() for p in net.parameters())
    t0 = time.perf_counter()
    _history, final, _steps = _fit(
        task,
        dm,
        trainer_kwargs={"max_epochs": args.epochs, "accelerator": "cpu", "devices": 1, "precision": "32-true"},
        has_val=False,
    )
    seconds = time.perf_counter() - t0

    xn, ref, valid, east = scene_inputs(mean, std)
    h, w = ref.shape
    net.eval()
    out: dict[str, Any] = {
        "setting": setting,
        "model": model,
        "seed": seed,
        "params": params,
        "tag": args.tag,
        "train_seconds": round(seconds, 1),
        "steps": steps_per_epoch * args.epochs,
        "final_train_loss": final.get("train_loss"),
    }
    with torch.inference_mode():
        logits = net(xn)[0, :, :h, :w]
        out["eval"] = score(logits.softmax(0).numpy(), ref, valid, east)
    if model == "vae":
        mean_pr = predict_full(net, xn, 0, seed, h, w)
        pr = predict_full(net, xn, args.eval_samples, seed, h, w)
        out["eval"] = score_uncertainty(mean_pr, ref, valid, east)
        out["eval_samples"] = score_uncertainty(pr, ref, valid, east)
        out["eval_samples"]["samples"] = args.eval_samples
        g = gulf_inputs()
        gulf = None
        if g is not None:
            gx, clear, cloud, gh, gw = g
            gulf = predict_full(net, gx, args.eval_samples, seed, gh, gw)
            gulf["mask_clear"], gulf["mask_cloud"] = clear, cloud
            out["gulf_recon_auroc_cloud"] = auroc(
                np.concatenate([gulf["recon"][cloud], gulf["recon"][clear]]),
                np.r_[np.ones(cloud.sum()), np.zeros(clear.sum())],
            )
            out["gulf_mi_auroc_cloud"] = auroc(
                np.concatenate([gulf["mi"][cloud], gulf["mi"][clear]]),
                np.r_[np.ones(cloud.sum()), np.zeros(clear.sum())],
            )
        out["ood"] = ood_scores(pr, ref, valid, east, gulf)
        out["reconstruction"] = reconstruction_sharpness(net, xn, mean, std, valid, h, w)
        out["final_kl"] = final.get("train_kl")
        out["final_recon"] = final.get("train_recon")
        out["mean_mi"] = float(pr["mi"][valid].mean())
        if args.save_probs:
            args.save_probs.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(
                args.save_probs / f"{args.tag}_{setting}_{model}_s{seed}.npz",
                mean=mean_pr["probs"][:, :, east].astype(np.float16),
                samples=pr["probs"][:, :, east].astype(np.float16),
                recon=pr["recon"][:, east].astype(np.float16),
                mi=pr["mi"][:, east].astype(np.float16),
            )
    else:
        with torch.inference_mode():
            p = net(xn)[0, :, :h, :w].softmax(0).numpy()
        pr = {"probs": p, "entropy": _entropy_np(p), "mi": np.zeros(p.shape[1:]), "recon": np.zeros(p.shape[1:])}
        out["eval"] = score_uncertainty(pr, ref, valid, east)
        if args.save_probs:
            args.save_probs.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(
                args.save_probs / f"{args.tag}_{setting}_{model}_s{seed}.npz", mean=p[:, :, east].astype(np.float16)
            )
    return out


def vae_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The VAESegmentationTask arguments a run's command line selects."""
    return {
        "base_channels": args.base_channels,
        "depth": args.depth,
        "latent_channels": args.latent_channels,
        "lr": args.lr,
        "beta": args.beta,
        "free_bits": args.free_bits,
        "recon_weight": args.recon_weight,
        "recon_condition": args.recon_condition,
        "head": args.head,
        "head_rank": args.head_rank,
        "train_samples": args.train_samples,
        "mixture_region": args.mixture_region,
        "augment": args.augment,
        "sample_entropy": args.sample_entropy,
        "pseudo_label": args.pseudo_label,
        "generated_weight": args.generated_weight,
        "ema": args.ema,
        "posterior": args.posterior,
        "adversarial": args.adversarial,
        "dice_weight": args.dice_weight,
    }


def ensemble_rows(files: list[Path], size: int = 3) -> list[dict[str, Any]]:
    """Deep ensembles from saved east-half probabilities: members s, s+n, s+2n of n seeds.

    Each file is one run (``--save-probs``); the files of one tag and setting are grouped by
    seed, and ensemble ``i`` averages the predictive probabilities of ``size`` runs with
    distinct seeds. Entropy of the average and the mutual information between members
    (entropy of the average minus the members' mean entropy) are scored for the errors.
    """
    import rasterio

    with rasterio.open(FULL) as s:
        ref = s.read(1)
    with rasterio.open(IMAGE) as s:
        valid = ~(s.read() == 0).all(0)
    w = ref.shape[1]
    k = round(w * 0.5)
    east = slice(w - k, w)
    r = ref[:, east]
    ok = valid[:, east] & (r > 0)
    groups: dict[tuple[str, str, str], list[tuple[int, Path]]] = {}
    for f in files:
        tag, setting, model, seed = f.stem.rsplit("_", 3)
        groups.setdefault((tag, setting, model), []).append((int(seed[1:]), f))
    rows = []
    for (tag, setting, model), runs in groups.items():
        runs.sort()
        n = len(runs) // size
        for key in ("mean", "samples"):
            for i in range(n):
                members = [np.load(runs[i + j * n][1]) for j in range(size)]
                if key not in members[0]:
                    continue
                ps = np.stack([m[key].astype(np.float32) for m in members])
                ps /= ps.sum(1, keepdims=True)
                pm = ps.mean(0)
                full = np.zeros((pm.shape[0], *ref.shape), np.float32)
                full[:, :, east] = pm
                sc = score(full, ref, valid, east)
                ent = _entropy_np(pm)
                mi = ent - np.mean([_entropy_np(p) for p in ps], axis=0)
                wrong = (pm.argmax(0) + 1)[ok] != r[ok]
                sc["auroc_entropy"] = auroc(ent[ok], wrong)
                sc["auroc_mi"] = auroc(mi[ok], wrong)
                sc["auroc_recon"] = float("nan")
                rows.append(
                    {
                        "setting": setting,
                        "model": f"ensemble{size}:{model}:{key}",
                        "tag": tag,
                        "seed": i,
                        "members": [runs[i + j * n][0] for j in range(size)],
                        "eval": sc,
                        "params": 0,
                        "train_seconds": 0,
                    }
                )
    return rows


def _ms(vals: list[float], digits: int = 3) -> str:
    a = np.array(vals, dtype=float)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: mean +- std over seeds per setting, tag and model (and scoring)."""
    lines = [
        "| setting | tag | model | params | mIoU | ECE | AUROC entropy | AUROC MI | AUROC recon | "
        "MI cloud/clear | MI east dev./other | train s | n |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r.get("tag", ""), r["model"]), []).append(r)

    def ratio(g: list[dict[str, Any]], a: str, b: str) -> str:
        v = [r["ood"][a] / max(r["ood"][b], 1e-12) for r in g if "ood" in r and a in r["ood"]]
        return _ms(v, 2) if v else ""

    for key in sorted(groups):
        g = groups[key]
        evals = [("eval", "latent mean" if key[2] == "vae" else "")]
        if all("eval_samples" in r for r in g):
            evals.append(("eval_samples", f"{g[0]['eval_samples'].get('samples', 8)} samples"))
        for ek, how in evals:
            e = [r[ek] for r in g]
            name = f"{key[2]} ({how})" if how else key[2]
            au = {
                m: _ms([x[f"auroc_{m}"] for x in e])
                if all(f"auroc_{m}" in x and math.isfinite(x[f"auroc_{m}"]) for x in e)
                else ""
                for m in ("entropy", "mi", "recon")
            }
            ood = ek == "eval_samples" or len(evals) == 1
            lines.append(
                f"| {key[0]} | {key[1]} | {name} | {g[0]['params']:,} | {_ms([x['mIoU'] for x in e])} | "
                f"{_ms([x['ECE'] for x in e])} | {au['entropy']} | {au['mi']} | {au['recon']} | "
                f"{ratio(g, 'mi_gulf_cloud', 'mi_gulf_clear') if ood else ''} | "
                f"{ratio(g, 'mi_nc_east_developed', 'mi_nc_east_other') if ood else ''} | "
                f"{np.mean([r['train_seconds'] for r in g]):.0f} | {len(g)} |"
            )
    return "\n".join(lines)


def speed(configs: list[dict[str, Any]], samples: list[int], threads: int, repeats: int) -> list[dict[str, Any]]:
    """``infer`` throughput (forward + reconstruction, batch 8, tile 128, fp32) of each
    architecture, interleaved so that the machine's load hits every model alike."""
    import torch

    from geovae.model.base import ModelInfo, SegmentationModel
    from geovae.model.vae import VAESegmenter

    torch.set_num_threads(threads)
    models = []
    for c in configs:
        m = VAESegmenter(6, 7, **c)
        models.append((c, SegmentationModel(m, ModelInfo(6, 7, stride=m.stride, tile_size=128), "cpu")))
    x = torch.rand(8, 6, 128, 128) * 100
    times: dict[tuple[int, int], list[float]] = {}
    for _, m in models:
        m.predict(x, max(samples), True)
    for _ in range(repeats):
        for i, (_, m) in enumerate(models):
            for s in samples:
                t = time.perf_counter()
                m.predict(x, s, True)
                times.setdefault((i, s), []).append(time.perf_counter() - t)
    px = 8 * 128 * 128
    return [
        {"arch": models[i][0], "samples": s, "mp_s": px / min(v) / 1e6, "median_mp_s": px / float(np.median(v)) / 1e6}
        for (i, s), v in times.items()
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["full", "sparse"], choices=["full", "sparse"])
    ap.add_argument("--models", nargs="+", default=["vae"], choices=["vae", "unet"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tag", default="default", help="name of this configuration in the table and saved files")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples-per-epoch", type=int, default=128)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--latent-channels", type=int, default=8)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--free-bits", type=float, default=0.05)
    ap.add_argument("--recon-weight", type=float, default=1.0)
    ap.add_argument("--dice-weight", type=float, default=0.0)
    ap.add_argument(
        "--recon-condition",
        default="class",
        choices=["class", "none"],
        help="reconstruction given z and the class (semi-supervised VAE) or z alone",
    )
    ap.add_argument("--head", default="lowrank", choices=["lowrank", "mlp"])
    ap.add_argument("--head-rank", type=int, default=2)
    ap.add_argument("--train-samples", type=int, default=8)
    ap.add_argument("--mixture-region", type=int, default=8)
    ap.add_argument("--sample-entropy", type=float, default=0.0)
    ap.add_argument("--pseudo-label", type=float, default=0.0)
    ap.add_argument("--generated-weight", type=float, default=0.0)
    ap.add_argument("--ema", type=float, default=0.0, help="moving average of the weights (decay)")
    ap.add_argument("--posterior", action="store_true", help="Probabilistic U-Net posterior q(z|x,y)")
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--adversarial", type=float, default=0.0)
    ap.add_argument(
        "--class-weighting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="inverse-sqrt class weights (both models)",
    )
    ap.add_argument("--eval-samples", type=int, default=8, help="latent samples when scoring the VAE")
    ap.add_argument(
        "--sampler",
        default="random",
        choices=["random", "labelled"],
        help="training patches (both models): anywhere, or each holding labels",
    )
    ap.add_argument("--no-unlabeled", action="store_true", help="sparse VAE without the unlabelled scene (ablation)")
    ap.add_argument("--full-unlabeled", action="store_true", help="full-label VAE also gets the scene unlabelled")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--json", type=Path, help="append one JSON line per run here")
    ap.add_argument("--save-probs", type=Path, help="save each run's east-half probabilities here (for ensembles)")
    ap.add_argument("--table", type=Path, nargs="+", help="only print the table of these JSON-lines files")
    ap.add_argument("--ensemble", type=Path, nargs="+", help="score deep ensembles of 3 from these saved runs")
    ap.add_argument("--speed", action="store_true", help="only measure infer() throughput of the architectures")
    args = ap.parse_args(argv)

    if args.table:
        rows = [json.loads(line) for f in args.table for line in f.read_text().splitlines() if line.strip()]
        print(table(rows))
        return 0
    if args.ensemble:
        rows = ensemble_rows(sorted(args.ensemble))
        if args.json:
            with open(args.json, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        print(table(rows))
        return 0
    if args.speed:
        configs = [
            {"base_channels": 32, "depth": 4},
            {"base_channels": 16, "depth": 4, "head": "lowrank"},
            {"base_channels": 16, "depth": 3, "head": "lowrank"},
            {"base_channels": 16, "depth": 3},
        ]
        res = speed(configs, [0, 4, 8], args.threads, 10)
        base = next(r["mp_s"] for r in res if r["arch"] == configs[0] and r["samples"] == 0)
        for r in res:
            r["speedup"] = r["mp_s"] / base
            print(json.dumps(r))
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
        return 0
    if not IMAGE.exists():
        print(f"real data not found: {IMAGE} (set GEOVAE_TEST_DATA)", file=sys.stderr)
        return 1
    _setup_torch(args.threads)
    import logging

    # An entry point: Lightning's INFO banners would drown the results table.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    budget = {
        k: getattr(args, k) for k in ("epochs", "samples_per_epoch", "tile", "batch_size", "lr", "threads", "sampler")
    }
    rows = []
    for setting in args.settings:
        for seed in args.seeds:
            for model in args.models:
                r = run_one(setting, model, seed, args)
                r["budget"] = budget
                r["vae_arch"] = vae_arguments(args)
                rows.append(r)
                e = r["eval"]
                es = r.get("eval_samples", e)
                print(
                    f"{args.tag} {setting:6s} {model:4s} seed {seed}: mIoU {e['mIoU']:.3f}/{es['mIoU']:.3f} "
                    f"ECE {e['ECE']:.3f}/{es['ECE']:.3f} AUROC ent {es['auroc_entropy']:.3f} "
                    f"mi {es['auroc_mi']:.3f} rec {es['auroc_recon']:.3f} "
                    f"ood {json.dumps({k: round(v, 4) for k, v in r.get('ood', {}).items() if k.startswith('mi_')})} "
                    f"rec {json.dumps({k: round(v, 3) for k, v in r.get('reconstruction', {}).items()})} "
                    f"({r['train_seconds']:.0f} s)",
                    flush=True,
                )
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
    print(table(rows))
    return 0 if all(math.isfinite(r["eval"]["mIoU"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
