"""The VAE segmenter as a TorchGeo task (a LightningModule): loss, warm-up, metrics, monitors.

:class:`VAESegmentationTask` consumes TorchGeo batches (``image``, ``mask``) from any TorchGeo
data module. With :class:`~geovae.training.SceneDataModule` it needs no band or class counts:
built without them (as ``torchgeo fit`` builds it from a YAML), it takes them, the scene's
normalisation and the classes from the data module when the trainer sets it up
(:meth:`VAESegmentationTask.setup`), and records them in its hyperparameters, so that its
checkpoint rebuilds the model with nothing else (:func:`geovae.model.io.load_model`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchgeo.tasks import BaseTask
from torchmetrics.classification import MulticlassConfusionMatrix

from geovae._version import __version__
from geovae.choices import Head, ReconCondition
from geovae.classes import rgb
from geovae.errors import ConfigError, ModelMismatchError, OptionError
from geovae.metrics import metrics_from_confusion
from geovae.model.base import ModelInfo
from geovae.model.losses import kl_warmup, sample_diversity, vae_segmentation_loss
from geovae.model.vae import VAESegmenter
from geovae.training.transforms import IGNORE_INDEX, merge_batches

__all__ = [
    "ACTIVE_KL",
    "DATA_ARGUMENTS",
    "NUMERIC_RANGES",
    "VAESegmentationTask",
    "balanced_class_weights",
    "check_hyperparameters",
    "data_arguments",
]

#: A latent channel whose KL (nats per latent cell) stays below this carries no information.
ACTIVE_KL = 0.01

#: Task arguments that describe the data rather than the model; a data module such as
#: :class:`~geovae.training.SceneDataModule` determines them (see :func:`data_arguments`).
DATA_ARGUMENTS = (
    "in_channels",
    "num_classes",
    "labels",
    "class_ids",
    "class_colors",
    "band_names",
    "mean",
    "std",
    "nodata",
)


def data_arguments(datamodule: Any, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The task arguments ``given`` completed from a data module: one rule for every way in.

    The data module provides ``in_channels``, ``num_classes``, ``mean``, ``std``, ``nodata``,
    ``band_names`` and ``classes`` (a :class:`~geovae.classes.ClassSpec`), as
    :class:`~geovae.training.SceneDataModule` does. The data's values replace the given
    ones, except a given ``mean`` or ``std`` (a user's own normalisation); a given
    ``in_channels`` or ``num_classes`` must equal the data's.

    Args:
        datamodule: the data module.
        given: task arguments given so far (a config's ``model`` section).

    Returns:
        ``given`` with every key of :data:`DATA_ARGUMENTS` set.

    Raises:
        ModelMismatchError: ``in_channels`` differs from the image's bands.
        ConfigError: ``num_classes`` differs from the data's classes, or the data module
            does not describe its data.
    """
    out = dict(given or {})
    bands, k = getattr(datamodule, "in_channels", None), getattr(datamodule, "num_classes", None)
    if not isinstance(bands, int) or not isinstance(k, int):
        raise ConfigError(
            f"data module {type(datamodule).__name__} does not give in_channels and num_classes; "
            f"set model in_channels and num_classes (or use geovae.training.SceneDataModule)"
        )
    where = getattr(datamodule, "image_path", "the data")
    if out.get("in_channels") is not None and out["in_channels"] != bands:
        raise ModelMismatchError(
            f"model.in_channels is {out['in_channels']} but image {where} has {bands} bands; "
            f"fix the config or the image"
        )
    if out.get("num_classes") is not None and out["num_classes"] != k:
        raise ConfigError(
            f"model.num_classes is {out['num_classes']} but the data has {k} classes; "
            f"drop model.num_classes or fix data.classes"
        )
    classes = getattr(datamodule, "classes", None)
    data = {
        "in_channels": bands,
        "num_classes": k,
        "band_names": getattr(datamodule, "band_names", None),
        "mean": getattr(datamodule, "mean", None),
        "std": getattr(datamodule, "std", None),
        "nodata": getattr(datamodule, "nodata", None),
        "labels": None,
        "class_ids": None,
        "class_colors": None,
    }
    if classes is not None:
        data.update(
            labels=list(classes.names),
            class_ids=list(classes.ids),
            class_colors=[list(c) for c in classes.colors] or None,
        )
    for key in DATA_ARGUMENTS:
        if key in ("mean", "std") and out.get(key) is not None:
            continue
        out[key] = data[key]
    for key in ("mean", "std"):
        if out[key] is not None:
            out[key] = [float(v) for v in out[key]]
    return out


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

    Without ``in_channels`` and ``num_classes`` the model is built when a trainer sets the
    task up, from the data module (:meth:`setup`): then every argument of
    :data:`DATA_ARGUMENTS` left at None comes from the data, the scene's mean and standard
    deviation included, so ``torchgeo fit`` trains on normalised input like ``geovae train``.

    Args:
        in_channels: number of input bands (None: from the data module).
        num_classes: number of classes (None: from the data module).
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
        head: see :class:`~geovae.model.vae.VAESegmenter` (``"lowrank"``: logits affine in
            the latent sample, so that samples are cheap and the mixture loss shapes them).
        head_rank: see :class:`~geovae.model.vae.VAESegmenter`.
        train_samples: latent samples per training step; with more than one the
            cross-entropy is the mixture likelihood of :func:`~geovae.model.losses.mixture_nll`.
        mixture_region: side in pixels of the regions the mixture likelihood scores jointly
            (1: per pixel; 0: whole tile).
        sample_entropy: weight of each latent sample's own entropy (see
            :func:`~geovae.model.losses.vae_segmentation_loss`): samples that commit.
        augment: random flips and quarter turns of each training patch (the D4 group).
        adversarial: weight of the PatchGAN critic's loss on the reconstruction (VAE-GAN;
            0 turns it off). The critic (:class:`~geovae.model.discriminator.PatchDiscriminator`)
            trains from the first step on real patches against reconstructions; the decoder
            gets the adversarial term from ``adversarial_start`` on, scaled by
            ``adversarial * ||grad recon|| / ||grad adv||`` at the decoder's last layer (the
            VQGAN rule), so that the two stay balanced whatever their raw scales. The critic
            is not part of the model file.
        adversarial_start: optimisation step at which the decoder starts getting the
            adversarial term (None: after the KL warm-up, ``kl_warmup_steps``).
        adversarial_lr: the critic's learning rate (None: ``lr``).
        pseudo_label: weight of self-training on unlabelled pixels (0: off): after the KL
            warm-up, an unlabelled pixel whose mean class probability over the latent samples
            exceeds ``pseudo_threshold`` is trained towards that class.
        pseudo_threshold: see ``pseudo_label``.
        ema: decay of an exponential moving average of the model's weights and BatchNorm
            statistics over the training steps (0: off); the model file gets the average.
            It acts like an ensemble of the last ``1 / (1 - ema)`` steps' models at the cost
            of one, which steadies a short training run's result (see docs/quality.md).
            Lightning checkpoints written during training hold the live weights.
        posterior: train with a label-aware posterior q(z | x, y)
            (:class:`~geovae.model.vae.PosteriorNet`, the Probabilistic U-Net's) and
            KL(q || p) to the segmenter's p(z | x), so that p spreads where labels are not
            predictable from the image; training only (the posterior is not in the model file).
        generated_weight: weight of generated training pairs (0: off): after the KL
            warm-up, each step decodes latent prior samples with the batch's class layout
            (labels where labelled, the model's classes elsewhere) and trains the segmenter
            on the labelled pixels of the generated images.
    """

    #: Monitored by the LR scheduler: always available, with or without validation.
    monitor = "train_loss"
    ignore = None
    # Buffers registered by configure_models, typed here: nn.Module's attribute lookup
    # would type them Tensor | Module.
    band_mean: Tensor
    band_std: Tensor
    class_weight: Tensor | None

    def __init__(
        self,
        in_channels: int | None = None,
        num_classes: int | None = None,
        *,
        labels: list[str] | None = None,
        class_ids: list[int] | None = None,
        class_colors: list[list[int]] | None = None,
        band_names: list[str] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        nodata: float | None = None,
        base_channels: int = 16,
        depth: int = 3,
        latent_channels: int = 8,
        encoder: str = "unet",
        recon_condition: ReconCondition = "class",
        head: Head = "lowrank",
        head_rank: int = 2,
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
        train_samples: int = 8,
        mixture_region: int = 8,
        sample_entropy: float = 0.0,
        augment: bool = True,
        adversarial: float = 0.0,
        adversarial_start: int | None = None,
        adversarial_lr: float | None = None,
        pseudo_label: float = 0.0,
        pseudo_threshold: float = 0.9,
        generated_weight: float = 0.0,
        ema: float = 0.0,
        posterior: bool = False,
    ) -> None:
        _check_arguments(locals())
        super().__init__()

    @property
    def _described(self) -> bool:
        return self.hparams["in_channels"] is not None and self.hparams["num_classes"] is not None

    # -- BaseTask hooks ---------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the :class:`~geovae.model.vae.VAESegmenter` and the normalisation buffers
        (deferred to :meth:`setup` while the band or class count is unknown)."""
        hp = self.hparams
        if not self._described:
            return
        self.model = VAESegmenter(
            hp["in_channels"],
            hp["num_classes"],
            base_channels=hp["base_channels"],
            depth=hp["depth"],
            latent_channels=hp["latent_channels"],
            encoder=hp["encoder"],
            recon_condition=hp.get("recon_condition", "class"),
            head=hp.get("head", "mlp"),
            head_rank=hp.get("head_rank", 2),
        )
        c = hp["in_channels"]
        mean = torch.tensor(hp["mean"] if hp["mean"] is not None else [0.0] * c, dtype=torch.float32)
        std = torch.tensor(hp["std"] if hp["std"] is not None else [1.0] * c, dtype=torch.float32)
        self.register_buffer("band_mean", mean.view(1, c, 1, 1))
        self.register_buffer("band_std", std.view(1, c, 1, 1))
        cw = hp["class_weights"]
        self.register_buffer("class_weight", torch.tensor(cw, dtype=torch.float32) if cw is not None else None)
        if hp.get("posterior"):
            from geovae.model.vae import PosteriorNet

            self.posterior_net = PosteriorNet(c, hp["num_classes"], hp["latent_channels"], hp["depth"])
        if float(hp.get("adversarial") or 0.0) > 0:
            from geovae.model.discriminator import PatchDiscriminator

            self.discriminator = PatchDiscriminator(c, base_channels=16, n_layers=3)

    def configure_metrics(self) -> None:
        """Confusion matrices (torchmetrics) from which IoU per class, mIoU and OA follow."""
        if not self._described:
            return
        k, ii = self.hparams["num_classes"], self.hparams["ignore_index"]
        self.train_cm = MulticlassConfusionMatrix(k, ignore_index=ii)
        self.val_cm = MulticlassConfusionMatrix(k, ignore_index=ii)

    def configure_optimizers(self) -> Any:
        """AdamW with ReduceLROnPlateau on the epoch's training loss.

        With ``adversarial``, the critic is a second parameter group of the same optimiser
        (its own learning rate, no weight decay, GAN betas): its loss only reaches its own
        parameters and the decoder's adversarial term only the model's (see
        :meth:`_adversarial`), so one step is a simultaneous update of both players.
        """
        hp = self.hparams
        critic = getattr(self, "discriminator", None)
        if critic is None:
            groups: Any = self.parameters()
        else:
            ids = {id(p) for p in critic.parameters()}
            groups = [
                {"params": [p for p in self.parameters() if id(p) not in ids]},
                {
                    "params": list(critic.parameters()),
                    "lr": hp.get("adversarial_lr") or hp["lr"],
                    "weight_decay": 0.0,
                    "betas": (0.5, 0.9),
                },
            ]
        opt = torch.optim.AdamW(groups, lr=hp["lr"], weight_decay=hp["weight_decay"])
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=self.hparams["patience"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor}}

    def setup(self, stage: str) -> None:
        """Complete the task from the trainer's data module when it was built without data.

        ``torchgeo fit`` builds the task from the YAML before the data module exists to it;
        here the data module (e.g. :class:`~geovae.training.SceneDataModule`) gives the band
        and class counts, the scene's normalisation and the classes (see
        :func:`data_arguments`). They go into the hyperparameters, so a checkpoint rebuilds
        the model alone.

        Raises:
            ConfigError: the counts were not given and the data module does not give them.
        """
        if self._described:
            return
        dm = getattr(self._trainer, "datamodule", None)  # Lightning sets it on the Trainer as it runs
        if dm is None:
            raise ConfigError(
                "VAESegmentationTask without in_channels and num_classes needs a data module that "
                "gives them (geovae.training.SceneDataModule); or set both"
            )
        given = {k: self.hparams[k] for k in DATA_ARGUMENTS}
        self.hparams.update(data_arguments(dm, given))
        _check_arguments(dict(self.hparams))
        self.configure_models()
        self.configure_metrics()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add what a geovae model file holds besides the hyperparameters: the training tile,
        the training data's facts for the trust check, and provenance (plain values only, so
        the checkpoint still loads with ``torch.load(weights_only=True)``)."""
        dm = getattr(self._trainer, "datamodule", None)  # Lightning sets it on the Trainer as it runs
        extra: dict[str, Any] = {"geovae_version": __version__}
        ps = getattr(dm, "patch_size", None)
        if ps is not None:
            extra["tile_size"] = int(ps if isinstance(ps, int) else ps[0])
        stats = getattr(dm, "stats", None)
        if stats is not None:
            extra["training"] = {"dtype": stats.dtype, "quantiles": stats.quantiles}
        if dm is not None and hasattr(dm, "describe"):
            extra["data"] = dm.describe()
        checkpoint["geovae"] = extra

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
            out,
            xn,
            mask,
            valid=valid,
            ignore_index=hp["ignore_index"],
            beta=beta,
            free_bits=hp["free_bits"],
            recon_weight=hp["recon_weight"],
            dice_weight=hp["dice_weight"],
            class_weights=self.class_weight,
            mixture_region=int(hp.get("mixture_region", 1)),
            sample_entropy=float(hp.get("sample_entropy", 0.0)),
        )

    # -- steps ---------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """One optimisation step on a (possibly partly unlabelled) batch."""
        xn, mask, valid = self._prepare(batch)
        if self.hparams.get("augment", False):
            xn, mask, valid = augment_d4(xn, mask, valid)
        q = None
        if getattr(self, "posterior_net", None) is not None:
            q = self.posterior_net(xn, mask, (mask != self.hparams["ignore_index"]) & valid)
        out = self.model.forward_all(xn, sample=True, samples=int(self.hparams.get("train_samples", 1)), posterior=q)
        beta = self._beta()
        terms = self._loss(out, xn, mask, valid, beta)
        bs = xn.shape[0]
        if getattr(self, "discriminator", None) is not None:
            adv = self._adversarial(out.reconstruction, xn, valid, terms["recon"])
            terms["loss"] = terms["loss"] + adv["loss"]
            for k in ("d_loss", "g_loss", "d_accuracy", "adv_weight"):
                self.log(f"train_{k}", adv[k].detach(), batch_size=bs, on_step=False, on_epoch=True)
        hp = self.hparams
        after_warmup = int(self.global_step) >= int(hp["kl_warmup_steps"])
        if float(hp.get("pseudo_label") or 0.0) > 0 and after_warmup and out.sample_logits is not None:
            pl_loss = self._pseudo_label(out.sample_logits, mask, valid)
            terms["loss"] = terms["loss"] + float(hp["pseudo_label"]) * pl_loss
            self.log("train_pseudo", pl_loss.detach(), batch_size=bs, on_step=False, on_epoch=True)
        if float(hp.get("generated_weight") or 0.0) > 0 and after_warmup:
            gen_loss = self._generated_pairs(out, mask, valid)
            terms["loss"] = terms["loss"] + float(hp["generated_weight"]) * gen_loss
            self.log("train_generated", gen_loss.detach(), batch_size=bs, on_step=False, on_epoch=True)
        for k in ("loss", "ce", "recon", "kl"):
            self.log(f"train_{k}", terms[k].detach(), batch_size=bs, on_step=False, on_epoch=True, prog_bar=k == "loss")
        self.log("train_beta", beta, batch_size=bs, on_step=False, on_epoch=True)
        self.log(
            "train_active_latents",
            (terms["kl_per_channel"] > ACTIVE_KL).sum().float(),
            batch_size=bs,
            on_step=False,
            on_epoch=True,
        )
        labelled = mask != self.hparams["ignore_index"]
        if bool(labelled.any()):
            self.train_cm.update(out.logits.detach().argmax(1), mask)
        return terms["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the moving average of the weights (``ema``)."""
        decay = float(self.hparams.get("ema") or 0.0)
        if decay <= 0:
            return
        state = self.model.state_dict()
        avg = getattr(self, "_ema_state", None)
        if avg is None:
            self._ema_state: dict[str, Tensor] | None = {k: v.detach().clone() for k, v in state.items()}
            return
        # The usual warm-up of the decay: early steps are not averaged over a long past.
        step = int(self.global_step)
        d = min(decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for k, v in state.items():
                if v.dtype.is_floating_point:
                    avg[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
                else:
                    avg[k].copy_(v)

    def on_train_end(self) -> None:
        """Put the moving average of the weights into the model (``ema``)."""
        avg = getattr(self, "_ema_state", None)
        if avg is not None:
            self.model.load_state_dict(avg)
            self._ema_state = None

    def _pseudo_label(self, sample_logits: Tensor, mask: Tensor, valid: Tensor) -> Tensor:
        """Mixture likelihood of confident classes on unlabelled pixels (self-training)."""
        from geovae.model.losses import mixture_nll

        with torch.no_grad():
            q = sample_logits.float().softmax(2).mean(0)
            conf, target = q.max(1)
            w = (mask == self.hparams["ignore_index"]) & valid & (conf > float(self.hparams["pseudo_threshold"]))
        if not bool(w.any()):
            return sample_logits.sum() * 0.0
        return mixture_nll(sample_logits.float(), target, w.float(), 1)

    def _generated_pairs(self, out: Any, mask: Tensor, valid: Tensor) -> Tensor:
        """Cross-entropy of the segmenter on images decoded from the prior with this batch's
        class layout, over its labelled pixels. The images are data (no gradient reaches the
        decoder) and do not move BatchNorm's running statistics (they are not scenes)."""
        from geovae.model.losses import mixture_nll
        from geovae.model.vae import class_argmax

        model = self.model
        ii = self.hparams["ignore_index"]
        labelled = (mask != ii) & valid
        if model.recon_condition != "class" or not bool(labelled.any()):
            return out.logits.sum() * 0.0
        with torch.no_grad():
            layout = torch.where(labelled, mask, class_argmax(out.logits.detach()))
            dec = model.recon_decoder
            xg = dec.decode(dec.features(torch.randn_like(out.mu)), layout)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.momentum = 0.0
        try:
            og = model.forward_all(xg, sample=True, samples=int(self.hparams.get("train_samples", 1)))
        finally:
            for m, mom in zip(bns, saved):
                m.momentum = mom
        logits = og.sample_logits if og.sample_logits is not None else og.logits[None]
        target = torch.where(labelled, mask, torch.zeros_like(mask))
        cw = self.class_weight[target] if self.class_weight is not None else torch.ones_like(xg[:, 0])
        return mixture_nll(logits.float(), target, cw * labelled, 1)

    def _adversarial(self, rec: Tensor, xn: Tensor, valid: Tensor, recon: Tensor) -> dict[str, Tensor]:
        """The critic's hinge loss and, after the warm-up, the decoder's balanced adversarial term.

        Nodata pixels are set to 0 (the band mean) in both the real and the rebuilt patch, so
        the critic cannot tell them apart by the fill. The decoder's term is computed with
        the critic's parameters frozen, and the critic's on detached reconstructions, so one
        backward pass gives each player only its own gradient.
        """
        from geovae.model.discriminator import adversarial_losses

        critic = self.discriminator
        hp = self.hparams
        v = valid[:, None].to(rec.dtype)
        real, fake = xn * v, rec * v
        start = hp.get("adversarial_start")
        start = int(hp["kl_warmup_steps"]) if start is None else int(start)
        d = adversarial_losses(critic, real, fake)
        g_loss = d["g_loss"]
        weight = torch.zeros((), device=rec.device)
        if int(self.global_step) >= start and torch.is_grad_enabled():
            last = self._last_decoder_weight()
            g_rec = torch.autograd.grad(recon * float(hp["recon_weight"]), last, retain_graph=True)[0]
            g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
            weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach() * float(hp["adversarial"])
        return {
            "loss": d["d_loss"] + weight * g_loss,
            "d_loss": d["d_loss"],
            "g_loss": g_loss,
            "d_accuracy": d["d_accuracy"],
            "adv_weight": weight,
        }

    def _last_decoder_weight(self) -> Tensor:
        dec = self.model.recon_decoder
        return dec.out.weight if hasattr(dec, "out") else dec[-1].weight

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss at the latent mean, metrics, and the diversity of latent samples."""
        xn, mask, valid = self._prepare(batch)
        out = self.model.forward_all(xn, sample=False)
        terms = self._loss(out, xn, mask, valid, float(self.hparams["beta"]))
        bs = xn.shape[0]
        for k in ("loss", "ce", "recon", "kl"):
            self.log(f"val_{k}", terms[k], batch_size=bs, on_step=False, on_epoch=True)
        self.log(
            "val_active_latents",
            (terms["kl_per_channel"] > ACTIVE_KL).sum().float(),
            batch_size=bs,
            on_step=False,
            on_epoch=True,
        )
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
        return {
            "probabilities": self.model(xn).softmax(1),
            "bounds": batch.get("bounds"),
            "transform": batch.get("transform"),
        }

    # -- the model file -------------------------------------------------------------------
    def model_info(
        self,
        *,
        tile_size: int,
        extra: Mapping[str, Any] | None = None,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
    ) -> ModelInfo:
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
        ex = {
            "geovae_version": __version__,
            "trainer": "geovae.training.VAESegmentationTask",
            "loss": {k: hp[k] for k in ("beta", "free_bits", "kl_warmup_steps", "recon_weight", "dice_weight")},
        }
        ex.update(extra or {})
        return ModelInfo(
            in_channels=c,
            num_classes=hp["num_classes"],
            class_ids=list(hp["class_ids"] or range(hp["num_classes"])),
            class_names=list(hp["labels"] or []),
            class_colors=[rgb(col) for col in (hp["class_colors"] or [])],
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            band_names=list(hp["band_names"]) if hp["band_names"] else None,
            tile_size=int(tile_size),
            stride=int(self.model.stride),
            kind="geovae-vae",
            arch=self.model.hparams,
            extra=ex,
        )


def augment_d4(image: Tensor, mask: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each patch flipped and turned by one of the 8 symmetries of the square, at random.

    Land cover seen from above has no preferred orientation; the same symmetry is applied to
    the patch's bands, labels and valid map. Square patches only (non-square are returned
    unchanged).

    Args:
        image: (B, C, H, W).
        mask: (B, H, W).
        valid: (B, H, W).

    Returns:
        The transformed ``(image, mask, valid)``.
    """
    if image.shape[-1] != image.shape[-2]:
        return image, mask, valid
    b = image.shape[0]
    turns = torch.randint(0, 4, (b,)).tolist()
    flips = torch.randint(0, 2, (b,)).tolist()
    xs, ms, vs = [], [], []
    for i in range(b):
        x, m, v = image[i], mask[i], valid[i]
        if flips[i]:
            x, m, v = x.flip(-1), m.flip(-1), v.flip(-1)
        if turns[i]:
            x, m, v = (torch.rot90(t, turns[i], (-2, -1)) for t in (x, m, v))
        xs.append(x)
        ms.append(m)
        vs.append(v)
    return torch.stack(xs), torch.stack(ms), torch.stack(vs)


#: Numeric hyperparameters and the range each must lie in: ``(low, high, low inclusive,
#: high inclusive)``, None for no bound. A value outside (or not finite: NaN, inf) turns
#: the loss non-finite or the model untrainable, so it is refused before any data is read.
NUMERIC_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lr": (0.0, None, False, True),
    "weight_decay": (0.0, None, True, True),
    "patience": (0.0, None, True, True),
    "beta": (0.0, None, True, True),
    "free_bits": (0.0, None, True, True),
    "kl_warmup_steps": (0.0, None, True, True),
    "kl_warmup_epochs": (0.0, None, True, True),  # train_model's and a config's top-level key
    "recon_weight": (0.0, None, True, True),
    "dice_weight": (0.0, None, True, True),
    "sample_entropy": (0.0, None, True, True),
    "adversarial": (0.0, None, True, True),
    "adversarial_start": (0.0, None, True, True),
    "adversarial_lr": (0.0, None, False, True),
    "pseudo_label": (0.0, None, True, True),
    "pseudo_threshold": (0.0, 1.0, True, True),
    "generated_weight": (0.0, None, True, True),
    "ema": (0.0, 1.0, True, False),
    "base_channels": (1.0, None, True, True),
    "depth": (1.0, None, True, True),
    "latent_channels": (1.0, None, True, True),
    "head_rank": (1.0, None, True, True),
    "train_samples": (1.0, None, True, True),
    "mixture_region": (0.0, None, True, True),
    "diversity_samples": (0.0, None, True, True),
}


def check_hyperparameters(args: Mapping[str, Any], prefix: str = "model.") -> None:
    """Refuse a numeric hyperparameter that is not finite or lies outside its range.

    Args:
        args: task arguments (missing keys and None are skipped).
        prefix: how the message names a key (``model.`` as in a config).

    Raises:
        OptionError: one line naming the key, its value and the range.
    """
    for key, (lo, hi, lo_in, hi_in) in NUMERIC_RANGES.items():
        v = args.get(key)
        if v is None or isinstance(v, bool):
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue  # a type error: the parser or the signature says so
        ok = math.isfinite(x)
        ok = ok and (lo is None or (x >= lo if lo_in else x > lo))
        ok = ok and (hi is None or (x <= hi if hi_in else x < hi))
        if not ok:
            lo_s = "" if lo is None else f"{'>=' if lo_in else '>'} {lo:g}"
            hi_s = "" if hi is None else f"{'<=' if hi_in else '<'} {hi:g}"
            want = " and ".join(s for s in (lo_s, hi_s) if s)
            raise OptionError(f"{prefix}{key} {v}: give a finite number {want}")
    for name in ("mean", "std", "class_weights"):
        vals = args.get(name)
        if vals is not None and not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vals):
            raise OptionError(f"{prefix}{name} {list(vals)}: every value must be a finite number")


def _check_arguments(args: Mapping[str, Any]) -> None:
    """Per-band and per-class lists must match the counts (where the counts are known), and
    every numeric hyperparameter be finite and in range (:func:`check_hyperparameters`)."""
    check_hyperparameters(args)
    c, k = args.get("in_channels"), args.get("num_classes")
    for name in ("mean", "std", "band_names"):
        v = args.get(name)
        if v is not None and c is not None and len(v) != c:
            raise ModelMismatchError(f"{name} has {len(v)} values but in_channels is {c}; give one per band")
    for name in ("labels", "class_ids", "class_colors", "class_weights"):
        v = args.get(name)
        if v is not None and k is not None and len(v) != k:
            raise ModelMismatchError(f"{name} has {len(v)} values but num_classes is {k}; give one per class")
    std = args.get("std")
    if std is not None and any(s <= 0 for s in std):
        raise OptionError("std: every band's standard deviation must be positive")


#: The keyword arguments of :class:`~geovae.model.vae.VAESegmenter` that set its architecture.
ARCHITECTURE_KEYS = ("base_channels", "depth", "latent_channels", "head", "head_rank")


def default_architecture() -> dict[str, Any]:
    """The architecture ``geovae train`` builds unless told otherwise: this task's defaults
    for :data:`ARCHITECTURE_KEYS`, read from its signature so that they cannot drift apart."""
    import inspect

    params = inspect.signature(VAESegmentationTask.__init__).parameters
    return {k: params[k].default for k in ARCHITECTURE_KEYS}
