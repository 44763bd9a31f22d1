"""The VAE segmenter as a TorchGeo task (a LightningModule): loss, warm-up, metrics, monitors.

:class:`VAESegmentationTask` consumes TorchGeo batches (``image``, ``mask``) from any TorchGeo
data module. With :class:`~geovae.training.SceneDataModule` it needs no band or class counts:
built without them (as ``torchgeo fit`` builds it from a YAML), it takes them, the scene's
normalisation and the classes from the data module when the trainer sets it up
(:meth:`VAESegmentationTask.setup`), and records them in its hyperparameters, so that its
checkpoint rebuilds the model with nothing else (:func:`geovae.model.io.load_model`).

Its signature is the one source of every argument's default (:func:`task_defaults`):
``geovae train``, :func:`~geovae.training.train_model` and the config parser read it. The
extras are composed, not built in: loss terms (:mod:`geovae.training.terms`: the critic,
pseudo-labels, generated pairs), callbacks (:mod:`geovae.training.callbacks`: the weight
average), the label-aware posterior (:class:`~geovae.model.vae.PosteriorNet`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
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
from geovae.model.encoders import encoder_architecture, encoder_record, encoder_weight_set, load_encoder
from geovae.model.losses import kl_warmup, sample_diversity, vae_segmentation_loss
from geovae.model.vae import PosteriorNet, VAESegmenter
from geovae.training.arguments import DATA_ARGUMENTS, check_arguments, check_finetuning, data_arguments
from geovae.training.callbacks import FreezeEncoder, WeightEMA
from geovae.training.terms import LossTerm, Step, build_terms, object_channels
from geovae.training.transforms import IGNORE_INDEX, augment_d4, merge_batches

__all__ = ["ACTIVE_KL", "ARCHITECTURE_KEYS", "VAESegmentationTask", "default_architecture", "task_defaults"]

#: A latent channel whose KL (nats per latent cell) stays below this carries no information.
ACTIVE_KL = 0.01

#: The keyword arguments of :class:`~geovae.model.vae.VAESegmenter` that set its architecture.
ARCHITECTURE_KEYS = ("base_channels", "depth", "latent_channels", "head", "head_rank")


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
        adversarial: weight of the PatchGAN critic on the reconstruction (VAE-GAN; 0: off),
            :class:`~geovae.training.terms.AdversarialTerm`. The critic is not part of the
            model file.
        adversarial_start: optimisation step at which the decoder starts getting the
            adversarial term (None: after the KL warm-up, ``kl_warmup_steps``).
        adversarial_lr: the critic's learning rate (None: ``lr``).
        pseudo_label: weight of self-training on unlabelled pixels after the KL warm-up
            (0: off), :class:`~geovae.training.terms.PseudoLabelTerm`.
        pseudo_threshold: the mean class probability above which an unlabelled pixel is
            trained towards its class.
        generated_weight: weight of generated training pairs after the KL warm-up (0: off),
            :class:`~geovae.training.terms.GeneratedPairsTerm`.
        object_weight: with a class named ``boundary`` (object labels), the model gets object
            heads (extent and distance to the outline) and this weight of their losses and
            of a boundary-aware loss, :class:`~geovae.training.terms.ObjectTerm`; 0: no heads.
        ema: decay of a moving average of the weights over the steps (0: off), which the
            model file gets (:class:`~geovae.training.callbacks.WeightEMA`); it steadies a
            short run's result (see docs/quality.md).
        posterior: train with a label-aware posterior q(z | x, y)
            (:class:`~geovae.model.vae.PosteriorNet`, the Probabilistic U-Net's) and
            KL(q || p) to the segmenter's p(z | x), so that p spreads where labels are not
            predictable from the image; training only (the posterior is not in the model file).
        encoder_weights: start from a TorchGeo encoder weight set (``ResNet18_Weights.LANDSAT_ETM_SR_MOCO``,
            ``torchgeo:`` optional; :func:`~geovae.model.pretrained.encoder_weight_set`): the
            encoder becomes the weight set's architecture (``encoder`` is set to it, so a
            checkpoint rebuilds the model without the weights), its weights are loaded
            through torch.hub's cache when fitting starts, the image must have the weight
            set's bands, and the input is normalised as the weights expect (unless ``mean``
            and ``std`` are given). Decoders, latent and heads start from scratch. The model
            file records the weight set's name and licence.
        freeze_encoder: keep the pretrained encoder's weights and BatchNorm statistics fixed
            (:class:`~geovae.training.callbacks.FreezeEncoder`): they are in the model file
            unchanged.
        unfreeze_after: with ``freeze_encoder``: keep the encoder fixed for this many epochs
            (fewer than the trainer's ``max_epochs``), then train it too.
    """

    #: Monitored by the LR scheduler: always available, with or without validation.
    monitor = "train_loss"
    ignore = None
    # Set by configure_models, typed here: nn.Module's attribute lookup would type them
    # Tensor | Module.
    band_mean: Tensor
    band_std: Tensor
    class_weight: Tensor | None
    posterior_net: PosteriorNet | None

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
        free_bits: float = 0.05,
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
        object_weight: float = 1.0,
        ema: float = 0.0,
        posterior: bool = False,
        encoder_weights: str | None = None,
        freeze_encoder: bool = False,
        unfreeze_after: int | None = None,
    ) -> None:
        check_arguments(locals())
        check_finetuning(encoder_weights, freeze_encoder, unfreeze_after)
        self._encoder_set = encoder_weight_set(encoder_weights) if encoder_weights else None
        if self._encoder_set is not None and encoder not in ("unet", encoder_architecture(self._encoder_set)):
            raise OptionError(
                f"encoder {encoder} and encoder_weights {encoder_weights}: the weights take the "
                f"{encoder_architecture(self._encoder_set)} encoder; leave encoder out"
            )
        super().__init__()

    @property
    def _described(self) -> bool:
        return self.hparams["in_channels"] is not None and self.hparams["num_classes"] is not None

    # -- BaseTask hooks ---------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the :class:`~geovae.model.vae.VAESegmenter`, the normalisation buffers, the
        posterior and the loss terms (deferred to :meth:`setup` while the band or class
        count is unknown). The order fixes which random numbers initialise what."""
        hp = self.hparams
        self.terms: list[LossTerm] = []
        self.posterior_net = None
        if not self._described:
            return
        c, k = hp["in_channels"], hp["num_classes"]
        ws = self._encoder_set
        if ws is not None:
            if c != ws.in_channels:
                bands = f" ({', '.join(ws.bands)})" if ws.bands else ""
                raise ModelMismatchError(
                    f"encoder weights {ws.name} take {ws.in_channels} bands{bands} but the training image has "
                    f"{c}; train on a scene with those bands, or leave out the encoder weights"
                )
            if ws.mean is None or ws.std is None:
                raise OptionError(
                    f"encoder weights {ws.name}: geovae cannot reproduce its normalisation: {ws.normalisation}"
                )
            hp["encoder"] = encoder_architecture(ws)
            if hp["mean"] is None:
                hp["mean"] = list(ws.mean)
            if hp["std"] is None:
                hp["std"] = list(ws.std)
        self._encoder_loaded = False
        self.model = VAESegmenter(
            c,
            k,
            base_channels=hp["base_channels"],
            depth=hp["depth"],
            latent_channels=hp["latent_channels"],
            encoder=hp["encoder"],
            recon_condition=hp["recon_condition"],
            head=hp["head"],
            head_rank=hp["head_rank"],
            object_heads=float(hp["object_weight"]) > 0 and object_channels(hp["labels"]) is not None,
        )
        mean = torch.tensor(hp["mean"] if hp["mean"] is not None else [0.0] * c, dtype=torch.float32)
        std = torch.tensor(hp["std"] if hp["std"] is not None else [1.0] * c, dtype=torch.float32)
        self.register_buffer("band_mean", mean.view(1, c, 1, 1))
        self.register_buffer("band_std", std.view(1, c, 1, 1))
        cw = hp["class_weights"]
        self.register_buffer("class_weight", torch.tensor(cw, dtype=torch.float32) if cw is not None else None)
        if hp["posterior"]:
            self.posterior_net = PosteriorNet(c, k, hp["latent_channels"], hp["depth"])
        self.terms = build_terms(hp)
        for term in self.terms:
            for name, module in term.modules().items():
                self.add_module(name, module)

    def configure_callbacks(self) -> list[pl.Callback]:
        """The callbacks the arguments select (``ema``, ``freeze_encoder``, ``unfreeze_after``):
        Lightning adds them to any trainer."""
        hp = self.hparams
        out: list[pl.Callback] = []
        if hp["freeze_encoder"]:
            out.append(FreezeEncoder(hp["unfreeze_after"]))
        if hp["ema"] > 0:
            out.append(WeightEMA(hp["ema"]))
        return out

    def configure_metrics(self) -> None:
        """Confusion matrices (torchmetrics) from which IoU per class, mIoU and OA follow."""
        if not self._described:
            return
        k, ii = self.hparams["num_classes"], self.hparams["ignore_index"]
        self.train_cm = MulticlassConfusionMatrix(k, ignore_index=ii)
        self.val_cm = MulticlassConfusionMatrix(k, ignore_index=ii)

    def configure_optimizers(self) -> Any:
        """AdamW with ReduceLROnPlateau on the epoch's training loss.

        A loss term that trains modules of its own with other settings (the critic) gives
        them as further parameter groups of the same optimiser. Frozen parameters are left out.
        """
        hp = self.hparams
        extra = [g for term in self.terms for g in term.param_groups(hp["lr"])]
        own = {id(p) for g in extra for p in g["params"]}
        params = [p for p in self.parameters() if id(p) not in own and p.requires_grad]
        groups: Any = [{"params": params}, *extra] if extra else params
        opt = torch.optim.AdamW(groups, lr=hp["lr"], weight_decay=hp["weight_decay"])
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=hp["patience"])
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
        if not self._described:
            self._complete_from_data()
        if stage == "fit" and self._encoder_set is not None and not self._encoder_loaded:
            # Here rather than at construction: a checkpoint's task is built without a download.
            load_encoder(self.model.encoder.encoder, self._encoder_set)
            self._encoder_loaded = True

    def _complete_from_data(self) -> None:
        dm = getattr(self._trainer, "datamodule", None)  # Lightning sets it on the Trainer as it runs
        if dm is None:
            raise ConfigError(
                "VAESegmentationTask without in_channels and num_classes needs a data module that "
                "gives them (geovae.training.SceneDataModule); or set both"
            )
        given = {k: self.hparams[k] for k in (*DATA_ARGUMENTS, "encoder_weights")}
        self.hparams.update(data_arguments(dm, given))
        check_arguments(dict(self.hparams))
        self.configure_models()
        self.configure_metrics()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint's weights replace the pretrained encoder's: they are not loaded again."""
        self._encoder_loaded = True

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
            mixture_region=int(hp["mixture_region"]),
            sample_entropy=float(hp["sample_entropy"]),
        )

    # -- steps ---------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """One optimisation step on a (possibly partly unlabelled) batch: the VAE loss plus
        the loss terms."""
        hp = self.hparams
        xn, mask, valid = self._prepare(batch)
        if hp["augment"]:
            xn, mask, valid = augment_d4(xn, mask, valid)
        q = None
        if self.posterior_net is not None:
            q = self.posterior_net(xn, mask, (mask != hp["ignore_index"]) & valid)
        out = self.model.forward_all(xn, sample=True, samples=int(hp["train_samples"]), posterior=q)
        beta = self._beta()
        terms = self._loss(out, xn, mask, valid, beta)
        bs = xn.shape[0]
        step = Step(self.model, out, xn, mask, valid, terms, int(self.global_step), self.class_weight)
        for term in self.terms:
            added = term(step)
            if added is None:
                continue
            terms["loss"] = terms["loss"] + added[0]
            for k, v in added[1].items():
                self.log(f"train_{k}", v, batch_size=bs, on_step=False, on_epoch=True)
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
        if bool((mask != hp["ignore_index"]).any()):
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
        if self._encoder_set is not None:
            ex["encoder_weights"] = encoder_record(self._encoder_set.name, hp["freeze_encoder"], hp["unfreeze_after"])
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


def task_defaults() -> dict[str, Any]:
    """Every argument of :class:`VAESegmentationTask` with its default: the one source of
    defaults that :func:`~geovae.training.train_model`, ``geovae train`` and configs use.

    Returns:
        ``{argument: default}`` in signature order.
    """
    params = list(inspect.signature(VAESegmentationTask.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params}


def default_architecture() -> dict[str, Any]:
    """The architecture ``geovae train`` builds unless told otherwise: the task's defaults
    for :data:`ARCHITECTURE_KEYS`."""
    defaults = task_defaults()
    return {k: defaults[k] for k in ARCHITECTURE_KEYS}
