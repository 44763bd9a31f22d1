"""Training the VAE segmenter through TorchGeo and Lightning.

:class:`VAESegmentationTask` is a TorchGeo :class:`~torchgeo.tasks.BaseTask` (a
LightningModule) that consumes TorchGeo batches (``image``, ``mask``) from any TorchGeo data
module, and :class:`~geovae.datasets.SceneDataModule` feeds it from the user's own GeoTIFFs.
Two ways in, both ending in a self-describing model file that ``geovae segment`` needs
nothing else to run:

* :func:`train_model` - an image, its labels (raster or vector) and a few options;
* :func:`train_from_config` - a LightningCLI-style YAML (``model`` / ``data`` / ``trainer``
  sections, validated by jsonargparse: an unknown key is a one-line :class:`ConfigError`).

Normalisation: band mean and standard deviation are computed scene-wide from the training
image (block by block, valid pixels only), applied inside the task, and saved in the model
file, so prediction normalises every tile of every scene with the same numbers.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchgeo.tasks import BaseTask
from torchmetrics.classification import MulticlassConfusionMatrix

from geovae._version import __version__
from geovae.atomic import check_output_file
from geovae.datasets import IGNORE_INDEX, SceneDataModule, merge_batches
from geovae.device import resolve_device
from geovae.errors import ConfigError, GeovaeError, ModelMismatchError, OptionError
from geovae.metrics import metrics_from_confusion
from geovae.model.base import ModelInfo
from geovae.model.losses import kl_warmup, sample_diversity, vae_segmentation_loss
from geovae.model.vae import VAESegmenter

log = logging.getLogger("geovae.train")

#: A latent channel whose KL (nats per latent cell) stays below this carries no information.
ACTIVE_KL = 0.01


def balanced_class_weights(counts: Mapping[int, int]) -> list[float]:
    """Cross-entropy weights proportional to 1/sqrt(class frequency).

    Scaled so that the weighted mean over the training pixels is 1 (the loss keeps its
    scale). A class without training pixels gets the weight of a class with one pixel; it
    never appears in a training target, so only its documentation value matters.

    Args:
        counts: ``{class id: labelled training pixels}`` in output-channel order.

    Returns:
        One weight per class.
    """
    freq = torch.tensor([max(int(c), 1) for c in counts.values()], dtype=torch.float64)
    w = 1.0 / freq.sqrt()
    w = w * freq.sum() / (w * freq).sum()
    return [float(v) for v in w]


class VAESegmentationTask(BaseTask):
    """The VAE segmenter as a TorchGeo task: loss, warm-up, metrics and collapse monitors.

    Batches are TorchGeo samples stacked by :func:`~torchgeo.datasets.stack_samples`:
    ``image`` (B, C, H, W) raw pixel values and ``mask`` (B, H, W) class indices 0..K-1 with
    ``ignore_index`` for unlabelled pixels (a batch without ``mask`` is wholly unlabelled). A
    batch may also be ``{"labeled": batch, "unlabeled": batch}`` from a CombinedLoader.
    Pixels where every band equals ``nodata`` are invalid: never scored, never reconstructed.

    Logged each step/epoch: ``train_loss``, ``train_ce``, ``train_recon``, ``train_kl``,
    ``train_beta``, ``train_active_latents``; each validation epoch: ``val_loss``, ``val_ce``,
    ``val_recon``, ``val_kl``, ``val_diversity`` (mean total-variation distance between
    latent samples: near 0 means the latent collapsed), ``val_active_latents``, ``val_mIoU``,
    ``val_OA`` and ``val_IoU_<class>``.

    Args:
        in_channels: number of input bands.
        num_classes: number of classes.
        labels: class names (TorchGeo's name for them).
        class_ids: raster value of each class (default 0..K-1).
        class_colors: RGB of each class.
        band_names: names of the input bands.
        mean: per-band mean subtracted before the model (default 0).
        std: per-band divisor (default 1).
        nodata: raw value marking missing data in a band (None: every pixel valid).
        base_channels: see :class:`~geovae.model.vae.VAESegmenter`.
        depth: see :class:`~geovae.model.vae.VAESegmenter`.
        latent_channels: see :class:`~geovae.model.vae.VAESegmenter`.
        encoder: see :class:`~geovae.model.vae.VAESegmenter`.
        recon_condition: see :class:`~geovae.model.vae.VAESegmenter` (``"class"``: unlabelled
            pixels train the classifier through the reconstruction).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        patience: epochs without improvement of ``train_loss`` before the LR is reduced.
        beta: final KL weight.
        free_bits: nats per latent channel and cell that are not penalised.
        kl_warmup_steps: optimisation steps over which beta rises linearly from 0.
        recon_weight: weight of the reconstruction term.
        dice_weight: weight of the soft-Dice term.
        class_weights: per-class cross-entropy weights.
        ignore_index: mask value of unlabelled pixels.
        diversity_samples: latent samples drawn per validation batch for ``val_diversity``.
    """

    #: Monitored by the LR scheduler: always available, with or without validation.
    monitor = "train_loss"
    ignore = None

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        *,
        labels: list[str] | None = None,
        class_ids: list[int] | None = None,
        class_colors: list[list[int]] | None = None,
        band_names: list[str] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        nodata: float | None = None,
        base_channels: int = 32,
        depth: int = 4,
        latent_channels: int = 8,
        encoder: str = "unet",
        recon_condition: str = "class",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        patience: int = 10,
        beta: float = 1.0,
        free_bits: float = 0.0,
        kl_warmup_steps: int = 0,
        recon_weight: float = 1.0,
        dice_weight: float = 0.0,
        class_weights: list[float] | None = None,
        ignore_index: int = IGNORE_INDEX,
        diversity_samples: int = 2,
    ) -> None:
        for name, v in (("mean", mean), ("std", std), ("band_names", band_names)):
            if v is not None and len(v) != in_channels:
                raise ModelMismatchError(f"{name} has {len(v)} values but in_channels is {in_channels}; give one per band")
        for name, v in (("labels", labels), ("class_ids", class_ids), ("class_colors", class_colors),
                        ("class_weights", class_weights)):
            if v is not None and len(v) != num_classes:
                raise ModelMismatchError(f"{name} has {len(v)} values but num_classes is {num_classes}; give one per class")
        if std is not None and any(s <= 0 for s in std):
            raise OptionError("std: every band's standard deviation must be positive")
        super().__init__()

    # -- BaseTask hooks ---------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the :class:`~geovae.model.vae.VAESegmenter` and the normalisation buffers."""
        hp = self.hparams
        self.model = VAESegmenter(
            hp["in_channels"], hp["num_classes"], base_channels=hp["base_channels"], depth=hp["depth"],
            latent_channels=hp["latent_channels"], encoder=hp["encoder"],
            recon_condition=hp.get("recon_condition", "class"),
        )
        c = hp["in_channels"]
        mean = torch.tensor(hp["mean"] if hp["mean"] is not None else [0.0] * c, dtype=torch.float32)
        std = torch.tensor(hp["std"] if hp["std"] is not None else [1.0] * c, dtype=torch.float32)
        self.register_buffer("band_mean", mean.view(1, c, 1, 1))
        self.register_buffer("band_std", std.view(1, c, 1, 1))
        cw = hp["class_weights"]
        self.register_buffer("class_weight", torch.tensor(cw, dtype=torch.float32) if cw is not None else None)

    def configure_metrics(self) -> None:
        """Confusion matrices (torchmetrics) from which IoU per class, mIoU and OA follow."""
        k, ii = self.hparams["num_classes"], self.hparams["ignore_index"]
        self.train_cm = MulticlassConfusionMatrix(k, ignore_index=ii)
        self.val_cm = MulticlassConfusionMatrix(k, ignore_index=ii)

    def configure_optimizers(self) -> Any:
        """AdamW with ReduceLROnPlateau on the epoch's training loss."""
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=self.hparams["patience"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor}}

    # -- data preparation --------------------------------------------------------------
    def normalise(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Raw bands -> model input, and the valid-pixel map.

        A band equal to ``nodata`` is set to the band mean (0 after normalisation), the same
        fill prediction uses for missing data, so the model never sees the nodata value.

        Args:
            image: (B, C, H, W) raw pixel values.

        Returns:
            ``(normalised image, valid)`` with valid (B, H, W) bool.
        """
        x = image.float()
        nd = self.hparams["nodata"]
        if nd is not None and not math.isnan(nd):
            band_missing = x == nd
        else:
            band_missing = ~torch.isfinite(x)
        valid = ~band_missing.all(dim=1)
        xn = (x - self.band_mean) / self.band_std
        xn = torch.where(band_missing, torch.zeros_like(xn), xn)
        return xn, valid

    def _prepare(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        batch = merge_batches(batch)
        xn, valid = self.normalise(batch["image"])
        ii = self.hparams["ignore_index"]
        mask = batch.get("mask")
        if mask is None:
            mask = torch.full(valid.shape, ii, dtype=torch.long, device=valid.device)
        else:
            if mask.ndim == 4:
                mask = mask[:, 0]
            mask = mask.long()
            # Labels under nodata pixels say nothing about what the model sees there.
            mask = torch.where(valid, mask, torch.full_like(mask, ii))
        return xn, mask, valid

    def _beta(self) -> float:
        return kl_warmup(int(self.global_step), int(self.hparams["kl_warmup_steps"]), float(self.hparams["beta"]))

    def _loss(self, out: Any, xn: Tensor, mask: Tensor, valid: Tensor, beta: float) -> dict[str, Tensor]:
        hp = self.hparams
        return vae_segmentation_loss(
            out, xn, mask, valid=valid, ignore_index=hp["ignore_index"], beta=beta, free_bits=hp["free_bits"],
            recon_weight=hp["recon_weight"], dice_weight=hp["dice_weight"], class_weights=self.class_weight,
        )

    # -- steps ---------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """One optimisation step on a (possibly partly unlabelled) batch."""
        xn, mask, valid = self._prepare(batch)
        out = self.model.forward_all(xn, sample=True)
        beta = self._beta()
        terms = self._loss(out, xn, mask, valid, beta)
        bs = xn.shape[0]
        for k in ("loss", "ce", "recon", "kl"):
            self.log(f"train_{k}", terms[k].detach(), batch_size=bs, on_step=False, on_epoch=True,
                     prog_bar=k == "loss")
        self.log("train_beta", beta, batch_size=bs, on_step=False, on_epoch=True)
        self.log("train_active_latents", (terms["kl_per_channel"] > ACTIVE_KL).sum().float(), batch_size=bs,
                 on_step=False, on_epoch=True)
        labelled = mask != self.hparams["ignore_index"]
        if bool(labelled.any()):
            self.train_cm.update(out.logits.detach().argmax(1), mask)
        return terms["loss"]

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss at the latent mean, metrics, and the diversity of latent samples."""
        xn, mask, valid = self._prepare(batch)
        out = self.model.forward_all(xn, sample=False)
        terms = self._loss(out, xn, mask, valid, float(self.hparams["beta"]))
        bs = xn.shape[0]
        for k in ("loss", "ce", "recon", "kl"):
            self.log(f"val_{k}", terms[k], batch_size=bs, on_step=False, on_epoch=True)
        self.log("val_active_latents", (terms["kl_per_channel"] > ACTIVE_KL).sum().float(), batch_size=bs,
                 on_step=False, on_epoch=True)
        n = int(self.hparams["diversity_samples"])
        if n >= 2 and bool(valid.any()):
            probs = self.model.sample(xn, n)
            # Diversity over valid pixels only: nodata padding would dilute it.
            probs = probs * valid[None, :, None].to(probs.dtype)
            div = sample_diversity(probs) * valid.numel() / valid.sum().clamp_min(1)
            self.log("val_diversity", div, batch_size=bs, on_step=False, on_epoch=True)
        self.val_cm.update(out.logits.argmax(1), mask)

    def on_train_epoch_end(self) -> None:
        """Log training mIoU / OA from the epoch's confusion matrix."""
        m = metrics_from_confusion(self.train_cm.compute())
        self.log("train_mIoU", m["mIoU"])
        self.log("train_OA", m["OA"])
        self.train_cm.reset()

    def on_validation_epoch_end(self) -> None:
        """Log validation mIoU, OA and per-class IoU."""
        cm = self.val_cm.compute()
        if cm.sum() > 0:
            names = self.hparams["labels"] or [str(i) for i in range(self.hparams["num_classes"])]
            for k, v in metrics_from_confusion(cm, names).items():
                if not math.isnan(v):
                    self.log(f"val_{k}", v)
        self.val_cm.reset()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor | None]:
        """Class probabilities at the latent mean, as TorchGeo's tasks return them."""
        xn, _, _ = self._prepare(batch)
        return {"probabilities": self.model(xn).softmax(1), "bounds": batch.get("bounds"),
                "transform": batch.get("transform")}

    # -- the model file -------------------------------------------------------------------
    def model_info(self, *, tile_size: int, extra: Mapping[str, Any] | None = None,
                   input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None) -> ModelInfo:
        """The :class:`~geovae.model.base.ModelInfo` describing this task's model.

        Args:
            tile_size: the training tile size (the default prediction tile).
            extra: provenance to store (training data, metrics...).
            input_mean: per-band mean a data module subtracted before the task (folded in).
            input_std: per-band divisor a data module applied before the task (folded in).

        Returns:
            The description that goes into the model file.
        """
        hp = self.hparams
        c = hp["in_channels"]
        mean = self.band_mean.flatten().double().cpu()
        std = self.band_std.flatten().double().cpu()
        if input_mean is not None or input_std is not None:
            # (x - m1) / s1 then (. - m2) / s2  ==  (x - (m1 + s1 m2)) / (s1 s2)
            m1 = torch.as_tensor(input_mean if input_mean is not None else 0.0, dtype=torch.float64).flatten()
            s1 = torch.as_tensor(input_std if input_std is not None else 1.0, dtype=torch.float64).flatten()
            m1, s1 = m1.expand(c) if m1.numel() == 1 else m1, s1.expand(c) if s1.numel() == 1 else s1
            mean, std = m1 + s1 * mean, s1 * std
        ex = {"geovae_version": __version__, "trainer": "geovae.train.VAESegmentationTask",
              "loss": {k: hp[k] for k in ("beta", "free_bits", "kl_warmup_steps", "recon_weight", "dice_weight")}}
        ex.update(extra or {})
        return ModelInfo(
            in_channels=c, num_classes=hp["num_classes"],
            class_ids=list(hp["class_ids"] or range(hp["num_classes"])),
            class_names=list(hp["labels"] or []),
            class_colors=[tuple(int(v) for v in col) for col in (hp["class_colors"] or [])],  # type: ignore[misc]
            mean=[float(v) for v in mean], std=[float(v) for v in std],
            band_names=list(hp["band_names"]) if hp["band_names"] else None,
            tile_size=int(tile_size), stride=int(self.model.stride), kind="geovae-vae",
            arch=self.model.hparams, extra=ex,
        )


# ----------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        model_path: the model file written.
        metrics: final metrics (validation metrics of the last epoch, training loss terms).
        history: one dict of logged metrics per epoch.
        info: the description saved in the model file.
    """

    model_path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    info: ModelInfo | None = None


class _History(pl.Callback):
    """Keeps every epoch's logged scalars (Lightning's loggers are off in library use)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = {"epoch": float(trainer.current_epoch), "seconds": time.perf_counter() - self._t0}
        for k, v in trainer.callback_metrics.items():
            if isinstance(v, Tensor) and v.numel() == 1:
                row[k] = float(v)
        self.epochs.append(row)


def _trainer_kwargs(device: str, progress: bool) -> dict[str, Any]:
    dev = resolve_device(device)
    if dev.type == "cuda":
        prec = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return {"accelerator": "gpu", "devices": [dev.index or 0], "precision": prec}
    return {"accelerator": "cpu", "devices": 1, "precision": "32-true", "enable_progress_bar": progress}


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Library use with few batches per epoch: these hints are noise to a geovae user.
    for msg in (".*does not have many workers.*", ".*number of training batches.*", ".*GPU available but not used.*",
                ".*Deprecated.*", ".*get_random_bounding_box.*", ".*LeafSpec.*", ".*treespec.*"):
        warnings.filterwarnings("ignore", message=msg)


def _check_out(out: str | os.PathLike[str]) -> Path:
    return check_output_file(out, example="model.safetensors")


def _save(path: Path, task: VAESegmentationTask, info: ModelInfo) -> Path:
    from geovae.model import io as model_io

    # save_model writes to a temporary name in the same folder and renames it when complete.
    return Path(model_io.save_model(path, task.model, info))


def _fit(task: VAESegmentationTask, dm: pl.LightningDataModule, *, trainer_kwargs: dict[str, Any],
         has_val: bool) -> tuple[list[dict[str, float]], dict[str, float]]:
    hist = _History()
    kw = dict(trainer_kwargs)
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("enable_model_summary", False)
    kw.setdefault("num_sanity_val_steps", 0)
    kw.setdefault("log_every_n_steps", 1)
    kw["callbacks"] = [*list(kw.get("callbacks") or []), hist]
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    if not has_val:
        kw["limit_val_batches"] = 0
    trainer = pl.Trainer(**kw)
    prev = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(task, datamodule=dm)
    except SystemExit:
        # Lightning answers Ctrl-C with sys.exit(1) and leaves SIGINT ignored; a library
        # caller (and the CLI's exit code 130) needs the KeyboardInterrupt back, and no
        # model file may be written from an interrupted run.
        if trainer.interrupted:
            signal.signal(signal.SIGINT, prev)
            raise KeyboardInterrupt from None
        raise
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, Tensor) and v.numel() == 1}
    return hist.epochs, final


def train_model(
    image: str | os.PathLike[str],
    labels: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = "model.safetensors",
    *,
    classes: str | Mapping[Any, Any] | None = None,
    vector_labels: str | os.PathLike[str] | None = None,
    label_field: str | None = None,
    unlabeled: Sequence[str | os.PathLike[str]] = (),
    epochs: int = 10,
    tile: int = 64,
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
    val_fraction: float = 0.25,
    val_side: str = "east",
    lr: float = 1e-3,
    beta: float = 1.0,
    free_bits: float = 0.05,
    kl_warmup_epochs: float = 1.0,
    recon_weight: float = 1.0,
    dice_weight: float = 0.0,
    class_weighting: str | None = "inverse-sqrt",
    samples_per_epoch: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    max_time: float | None = None,
    base_channels: int = 32,
    depth: int = 4,
    latent_channels: int = 8,
    encoder: str = "unet",
    sampler: str = "random",
) -> TrainResult:
    """Train the VAE segmenter on one labelled scene and write a model file.

    Data flows through TorchGeo (:class:`~geovae.datasets.SceneDataModule`): random training
    patches from the training part of the scene, gridded validation patches from the part
    held out on ``val_side`` (``val_fraction`` of its width or height), unlabelled scenes as
    extra all-ignore batches. The model file is written atomically to ``out``.

    Args:
        image: the training image (any GDAL raster).
        labels: label raster on the image's grid (value 0 or its nodata = unlabelled).
        out: model file to write (``.safetensors``).
        classes: ``"1:developed,5:forest"`` or ``{1: "developed"}``; None for every label
            id present. Colours come from the label raster's colour table when it has one.
        vector_labels: vector labels (GPKG, GeoJSON, shapefile) instead of ``labels``.
        label_field: attribute of ``vector_labels`` holding the class id or class name.
        unlabeled: extra scenes without labels (semi-supervised: reconstruction + KL only).
        epochs: training epochs.
        tile: patch size in pixels (a multiple of ``2**depth``).
        batch_size: patches per step.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; CUDA trains in mixed precision.
        seed: seed of weights, sampling and latent noise.
        val_fraction: share of the scene held out for validation (0 for none).
        val_side: side held out: east, west, north or south.
        lr: learning rate (AdamW).
        beta: final KL weight (the losses' per-pixel convention: 1 is the ELBO balance).
        free_bits: nats per latent channel and cell the KL does not penalise.
        kl_warmup_epochs: epochs over which the KL weight rises from 0 to ``beta``.
        recon_weight: weight of the reconstruction term.
        dice_weight: weight of a soft-Dice term added to the cross-entropy.
        class_weighting: ``"inverse-sqrt"`` weights the cross-entropy by 1/sqrt(class
            frequency) in the training part of the labels (rare classes count more, which
            mIoU rewards); None for the plain mean over labelled pixels.
        samples_per_epoch: training patches per epoch (default 4x the non-overlapping tiles).
        num_workers: DataLoader worker processes.
        progress: show a progress bar.
        max_time: stop after this many seconds of training (the last weights are saved).
        base_channels: model width.
        depth: number of stride-2 stages (model stride ``2**depth``).
        latent_channels: channels of the latent map.
        encoder: ``"unet"`` or ``"smp:<name>"``.
        sampler: training patches: ``"random"`` or ``"labelled"`` (every patch holds
            labels); see :class:`~geovae.datasets.SceneDataModule`.

    Returns:
        A :class:`TrainResult`.

    Raises:
        SceneError, LabelsError, OptionError, ModelMismatchError, OutputError: bad input,
            each with a one-line message; raised before any training.
    """
    _quiet_lightning()
    out_path = _check_out(out)
    if epochs < 1:
        raise OptionError(f"--epochs {epochs}: train for at least one epoch")
    stride = 2**depth
    if tile % stride:
        raise OptionError(f"--tile {tile}: must be a multiple of the model stride {stride} (depth {depth}); "
                          f"try {max(stride, round(tile / stride) * stride)}")
    if class_weighting not in (None, "inverse-sqrt"):
        raise OptionError(f"class_weighting {class_weighting!r}: use None or 'inverse-sqrt'")
    trainer_kw = _trainer_kwargs(device, progress)
    pl.seed_everything(seed, workers=True, verbose=False)

    dm = SceneDataModule(
        str(image), str(labels) if labels else None, vector_labels=str(vector_labels) if vector_labels else None,
        label_field=label_field, classes=classes, unlabeled=[str(u) for u in unlabeled], tile=tile,  # type: ignore[arg-type]
        batch_size=batch_size, val_fraction=val_fraction, val_side=val_side, samples_per_epoch=samples_per_epoch,
        num_workers=num_workers, seed=seed, sampler=sampler,
    )
    from geovae.bands import band_statistics
    _stats = band_statistics(dm.image_path)
    mean, std = _stats.mean, _stats.std
    class_weights = balanced_class_weights(dm.train_class_counts) if class_weighting == "inverse-sqrt" else None

    steps_per_epoch = dm.length // batch_size
    task = VAESegmentationTask(
        dm.facts.count, dm.classes.num_classes, labels=dm.classes.names, class_ids=dm.classes.ids,
        class_colors=[list(c) for c in dm.classes.colors], band_names=dm.facts.band_names, mean=mean, std=std,
        nodata=dm.facts.nodata, base_channels=base_channels, depth=depth, latent_channels=latent_channels,
        encoder=encoder, lr=lr, beta=beta, free_bits=free_bits,
        kl_warmup_steps=int(round(kl_warmup_epochs * steps_per_epoch)), recon_weight=recon_weight,
        dice_weight=dice_weight, class_weights=class_weights,
    )
    trainer_kw.update(max_epochs=epochs, enable_progress_bar=progress)
    if max_time is not None:
        if max_time <= 0:
            raise OptionError(f"max_time {max_time}: give a positive number of seconds")
        trainer_kw["max_time"] = timedelta(seconds=float(max_time))
    has_val = dm.val_box is not None and dm.n_labelled["val"] != 0
    if dm.val_box is not None and not has_val:
        log.warning("no labelled pixels in the validation part; training without validation metrics")
    t0 = time.perf_counter()
    history, final = _fit(task, dm, trainer_kwargs=trainer_kw, has_val=has_val)
    seconds = time.perf_counter() - t0

    metrics = {k: v for k, v in final.items() if not math.isnan(v)}
    extra = {"data": dm.describe(), "metrics": metrics, "epochs": len(history), "seconds": round(seconds, 2),
             "seed": seed, "batch_size": batch_size, "samples_per_epoch": dm.length}
    info = task.model_info(tile_size=tile, extra=extra)
    path = _save(out_path, task, info)
    return TrainResult(model_path=path, metrics=metrics, history=history, info=info)


# ----------------------------------------------------------------------------- config files
#: Keys of the ``trainer`` section that are passed to :class:`lightning.pytorch.Trainer`.
def _trainer_section(
    max_epochs: int = 10,
    max_time: str | None = None,
    max_steps: int = -1,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    precision: str | int | None = None,
    limit_train_batches: int | float | None = None,
    limit_val_batches: int | float | None = None,
    check_val_every_n_epoch: int | None = 1,
    gradient_clip_val: float | None = None,
    accumulate_grad_batches: int = 1,
    deterministic: bool | None = None,
    enable_progress_bar: bool | None = None,
    log_every_n_steps: int | None = None,
    default_root_dir: str | None = None,
) -> None:
    """The supported ``trainer:`` keys (a subset of :class:`lightning.pytorch.Trainer`'s).

    Args:
        max_epochs: training epochs.
        max_time: wall-clock limit, ``"DD:HH:MM:SS"``.
        max_steps: step limit (-1: none).
        accelerator: ``auto``, ``cpu``, ``gpu``/``cuda``.
        devices: device count or ids.
        precision: ``32-true``, ``16-mixed``, ``bf16-mixed``... (default: mixed on CUDA).
        limit_train_batches: batches (int) or share (float) of each training epoch.
        limit_val_batches: batches or share of each validation epoch.
        check_val_every_n_epoch: validation frequency.
        gradient_clip_val: gradient clipping norm.
        accumulate_grad_batches: gradient accumulation.
        deterministic: deterministic algorithms.
        enable_progress_bar: progress bar.
        log_every_n_steps: logging frequency.
        default_root_dir: Lightning's working folder.
    """


#: Task arguments that come from the data when ``data`` is geovae's SceneDataModule.
_DATA_DERIVED = ("in_channels", "num_classes", "labels", "class_ids", "class_colors", "band_names", "mean", "std",
                 "nodata")


def _config_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning.pytorch import LightningDataModule

    p = ArgumentParser(prog="geovae train --config", exit_on_error=False, default_env=False)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--seed_everything", type=int, default=0, help="Seed of weights, sampling and noise.")
    p.add_argument("--out", type=str, default="model.safetensors", help="Model file to write.")
    p.add_argument("--tile_size", type=int | None, default=None,
                   help="Training tile recorded in the model file (default: data.init_args.tile or patch_size).")
    p.add_argument("--kl_warmup_epochs", type=float | None, default=None,
                   help="Set model.kl_warmup_steps from epochs (needs a SceneDataModule).")
    p.add_argument("--class_weighting", type=str | None, default="inverse-sqrt",
                   help="inverse-sqrt (from the training labels) or null; ignored when model.class_weights is set.")
    p.add_class_arguments(VAESegmentationTask, "model", instantiate=False, fail_untyped=False,
                          skip={"in_channels", "num_classes"})
    # None = "take it from the data"; a value is checked against the data.
    p.add_argument("--model.in_channels", type=int | None, default=None, help="Input bands (default: the image's).")
    p.add_argument("--model.num_classes", type=int | None, default=None, help="Classes (default: from the labels).")
    p.add_subclass_arguments(LightningDataModule, "data", instantiate=False, required=True)
    p.add_function_arguments(_trainer_section, "trainer")
    return p


def _first_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg[:300]


def _normalise_config(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """Accept ``data: {image: ...}`` without class_path as geovae's SceneDataModule, and
    ``model: {class_path: ..., init_args: {...}}`` as LightningCLI writes it."""
    cfg = dict(raw)
    base = Path(path).resolve().parent
    model = cfg.get("model")
    if isinstance(model, dict) and "class_path" in model:
        cp = model["class_path"]
        if cp not in ("geovae.train.VAESegmentationTask", "VAESegmentationTask"):
            raise ConfigError(f"{path}: model.class_path {cp!r} is not supported; use geovae.train.VAESegmentationTask")
        # Keys beside class_path (as --set model.lr=... writes them) override init_args.
        cfg["model"] = {**(model.get("init_args") or {}),
                        **{k: v for k, v in model.items() if k not in ("class_path", "init_args")}}
    data = cfg.get("data")
    if isinstance(data, dict) and "class_path" not in data:
        cfg["data"] = {"class_path": "geovae.datasets.SceneDataModule", "init_args": data}
    elif isinstance(data, dict):
        extra = {k: v for k, v in data.items() if k not in ("class_path", "init_args", "dict_kwargs")}
        cfg["data"] = {"class_path": data["class_path"], "init_args": {**(data.get("init_args") or {}), **extra}}
    data = cfg.get("data")
    if isinstance(data, dict) and data.get("class_path") in ("geovae.datasets.SceneDataModule", "SceneDataModule"):
        data["class_path"] = "geovae.datasets.SceneDataModule"
        ia = dict(data.get("init_args") or {})
        for key in ("image", "labels", "vector_labels"):
            if isinstance(ia.get(key), str):
                ia[key] = _resolve_path(ia[key], base)
        if isinstance(ia.get("unlabeled"), list):
            ia["unlabeled"] = [_resolve_path(u, base) if isinstance(u, str) else u for u in ia["unlabeled"]]
        if isinstance(ia.get("classes"), dict):
            ia["classes"] = ",".join(f"{k}:{v}" for k, v in ia["classes"].items())
        data["init_args"] = ia
    return cfg


def _resolve_path(value: str, base: Path) -> str:
    """A relative path in a config: from the working directory (as LightningCLI reads it),
    else from the config file's folder."""
    if "://" in value or value.startswith("/vsi") or os.path.isabs(value) or Path(value).exists():
        return value
    alt = base / value
    return str(alt) if alt.exists() else value


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Any:
    """Read and validate a training config (without training).

    Args:
        path: the YAML file.
        overrides: ``"section.key=value"`` strings applied after the file
            (e.g. ``"trainer.max_epochs=3"``).

    Returns:
        The validated jsonargparse namespace.

    Raises:
        ConfigError: if the file is missing, not YAML, or holds unknown keys or bad values.
    """
    import yaml

    p = str(path)
    if not Path(p).is_file():
        raise ConfigError(f"config {p}: no such file; check the path (examples are in configs/)")
    try:
        raw = yaml.safe_load(Path(p).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p}: not valid YAML ({_first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {p}: expected a mapping with model/data/trainer sections")
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {o!r}: expected KEY=VALUE such as trainer.max_epochs=3")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {o!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    cfg = _normalise_config(raw, p)
    parser = _config_parser()
    try:
        return parser.parse_object(cfg)
    except Exception as e:  # jsonargparse raises ArgumentError/TypeError/ValueError with long text
        raise ConfigError(f"config {p}: {_explain_config_error(_first_line(e), cfg)}") from None


def _valid_keys(section: str, cfg: Mapping[str, Any]) -> list[str]:
    import inspect

    if section == "model":
        return [*inspect.signature(VAESegmentationTask.__init__).parameters][1:]
    if section == "trainer":
        return [*inspect.signature(_trainer_section).parameters]
    if section == "data":
        return [*inspect.signature(SceneDataModule.__init__).parameters][1:]
    return ["seed_everything", "out", "tile_size", "kl_warmup_epochs", "class_weighting", "model", "data", "trainer"]


def _explain_config_error(msg: str, cfg: Mapping[str, Any]) -> str:
    """One line naming the offending key, and the closest valid key when there is one."""
    import difflib
    import re

    section, key = None, None
    m = re.search(r"Group '(\w+)' does not accept option '([\w.]+)'", msg)
    if m:
        section, key = m.group(1), m.group(2)
    else:
        m = re.search(r"Option '([\w.]+)' is not accepted", msg)
        if m:
            key = m.group(1)
            section = "data" if "class_path" in msg else None
    if key is not None:
        if "." in key and section is None:
            section, key = key.split(".", 1)
        full = f"{section}.{key}" if section else key
        close = difflib.get_close_matches(key, _valid_keys(section or "", cfg), n=1)
        hint = f"did you mean {section + '.' if section else ''}{close[0]}?" if close else "see docs/training.md for the keys"
        return f"unknown key {full}; {hint}"
    m = re.search(r'Parser key "([\w.]+)": Expected a (.+?)\. Got value: (.+?)(?: -|$)', msg)
    if m:
        return f"{m.group(1)}: expected {m.group(2).replace('<class ', '').replace('>', '')}, got {m.group(3).strip()!r}"
    return msg


def train_from_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainResult:
    """Train from a LightningCLI-style YAML config (``geovae train --config X.yaml``).

    The config has ``model`` (arguments of :class:`VAESegmentationTask`), ``data`` (either
    the arguments of :class:`~geovae.datasets.SceneDataModule` directly, or ``class_path`` +
    ``init_args`` of any Lightning/TorchGeo data module), ``trainer`` (see
    :func:`_trainer_section`), and top-level ``seed_everything`` and ``out``. Relative paths
    are relative to the config file. With geovae's data module the band count, classes and
    band statistics come from the data; with another data module, ``model.in_channels`` and
    ``model.num_classes`` must be given and the module's own ``mean``/``std`` (TorchGeo's
    convention) are folded into the model file's normalisation.

    Args:
        path: the YAML file.
        overrides: ``"section.key=value"`` strings (``geovae train --set``).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: unknown keys or bad values.
        ModelMismatchError: the config's ``model.in_channels`` differs from the image's bands.
        GeovaeError: any other bad input, as :func:`train_model` raises it.
    """
    from jsonargparse import Namespace

    _quiet_lightning()
    cfg = load_config(path, overrides)
    p = str(path)
    out_path = _check_out(cfg.out)
    seed = int(cfg.seed_everything)
    pl.seed_everything(seed, workers=True, verbose=False)
    model_args: dict[str, Any] = cfg.model.as_dict() if isinstance(cfg.model, Namespace) else dict(cfg.model)
    model_args = {k: v for k, v in model_args.items() if k not in ("__path__",)}
    data_cfg = cfg.data
    class_path = data_cfg.class_path
    init_args = data_cfg.init_args.as_dict() if isinstance(data_cfg.init_args, Namespace) else dict(data_cfg.init_args or {})
    init_args = {k: v for k, v in init_args.items() if k != "__path__"}

    import importlib

    mod_name, _, cls_name = class_path.rpartition(".")
    try:
        dm_cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError):
        raise ConfigError(f"config {p}: data.class_path {class_path!r} cannot be imported") from None

    trainer_args = {k: v for k, v in cfg.trainer.as_dict().items() if v is not None and k != "__path__"}
    accel = str(trainer_args.get("accelerator", "auto"))
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise OptionError(f"config {p}: trainer.accelerator {accel}: no CUDA device is available; use auto or cpu")
    use_cuda = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    if "precision" not in trainer_args:
        trainer_args["precision"] = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if use_cuda else "32-true"
    if "max_time" in trainer_args and trainer_args["max_time"] is None:
        del trainer_args["max_time"]

    input_mean = input_std = None
    if issubclass(dm_cls, SceneDataModule):
        dm = dm_cls(**init_args)
        from geovae.bands import band_statistics

        given = {k: model_args.get(k) for k in ("in_channels", "num_classes") if model_args.get(k) is not None}
        if "in_channels" in given and given["in_channels"] != dm.facts.count:
            raise ModelMismatchError(f"config {p}: model.in_channels is {given['in_channels']} but image "
                                     f"{dm.image_path} has {dm.facts.count} bands; fix the config or the image")
        if "num_classes" in given and given["num_classes"] != dm.classes.num_classes:
            raise ConfigError(f"config {p}: model.num_classes is {given['num_classes']} but the data has "
                              f"{dm.classes.num_classes} classes; drop model.num_classes or fix data.classes")
        _stats = band_statistics(dm.image_path)
        mean, std = _stats.mean, _stats.std
        model_args.update(in_channels=dm.facts.count, num_classes=dm.classes.num_classes, labels=dm.classes.names,
                          class_ids=dm.classes.ids, class_colors=[list(c) for c in dm.classes.colors],
                          band_names=dm.facts.band_names, mean=model_args.get("mean") or mean,
                          std=model_args.get("std") or std, nodata=dm.facts.nodata)
        if cfg.kl_warmup_epochs is not None:
            model_args["kl_warmup_steps"] = int(round(cfg.kl_warmup_epochs * dm.length / dm.batch_size))
        if cfg.class_weighting not in (None, "inverse-sqrt"):
            raise ConfigError(f"config {p}: class_weighting {cfg.class_weighting!r}: use inverse-sqrt or null")
        if cfg.class_weighting == "inverse-sqrt" and model_args.get("class_weights") is None:
            model_args["class_weights"] = balanced_class_weights(dm.train_class_counts)
        tile = cfg.tile_size or dm.tile
        has_val = dm.val_box is not None and dm.n_labelled["val"] != 0
        provenance = dm.describe()
    else:
        for k in ("in_channels", "num_classes"):
            if model_args.get(k) is None:
                raise ConfigError(f"config {p}: model.{k} is required with data module {class_path}")
        try:
            dm = dm_cls(**init_args)
        except GeovaeError:
            raise
        except Exception as e:
            raise ConfigError(f"config {p}: data module {class_path} failed: {_first_line(e)}") from None
        if cfg.kl_warmup_epochs is not None:
            raise ConfigError(f"config {p}: kl_warmup_epochs needs geovae's SceneDataModule; set model.kl_warmup_steps")
        ps = init_args.get("patch_size", 256)
        tile = cfg.tile_size or (ps if isinstance(ps, int) else int(ps[0]))
        has_val = True
        provenance = {"datamodule": class_path, "init_args": {k: str(v) for k, v in init_args.items()}}
        # TorchGeo data modules normalise batches with their own mean/std before the task.
        if hasattr(dm, "mean") and hasattr(dm, "std"):
            input_mean = torch.as_tensor(dm.mean, dtype=torch.float64).flatten().tolist()
            input_std = torch.as_tensor(dm.std, dtype=torch.float64).flatten().tolist()
    for k in list(model_args):
        if model_args[k] is None and k in ("labels", "class_ids", "class_colors", "band_names", "mean", "std",
                                           "nodata", "class_weights"):
            model_args.pop(k)
    in_ch, n_cls = model_args.pop("in_channels"), model_args.pop("num_classes")
    task = VAESegmentationTask(in_ch, n_cls, **model_args)
    t0 = time.perf_counter()
    history, final = _fit(task, dm, trainer_kwargs=trainer_args, has_val=has_val)
    metrics = {k: v for k, v in final.items() if not math.isnan(v)}
    extra = {"data": provenance, "metrics": metrics, "epochs": len(history),
             "seconds": round(time.perf_counter() - t0, 2), "seed": seed, "config": os.path.abspath(p)}
    info = task.model_info(tile_size=int(tile), extra=extra, input_mean=input_mean, input_std=input_std)
    path_out = _save(out_path, task, info)
    return TrainResult(model_path=path_out, metrics=metrics, history=history, info=info)


__all__ = ["VAESegmentationTask", "TrainResult", "train_model", "train_from_config", "load_config",
           "metrics_from_confusion", "balanced_class_weights"]

