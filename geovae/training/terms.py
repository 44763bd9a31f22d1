"""Extra terms of the training loss, each switched on by one task argument.

The VAE loss (:func:`~geovae.model.losses.vae_segmentation_loss`) is the base of every
training step; a :class:`LossTerm` adds to it from its ``start`` step on and names the
values it logs (``train_<name>``). The task builds the terms its arguments select
(:func:`build_terms`), registers the modules a term trains (:meth:`LossTerm.modules`, under
the same names as in earlier checkpoints) and gives a term's optimiser groups
(:meth:`LossTerm.param_groups`) to its optimiser. None of them is part of the model file.

- :class:`AdversarialTerm` (``adversarial``): a PatchGAN critic on the reconstruction (VAE-GAN).
- :class:`PseudoLabelTerm` (``pseudo_label``): self-training on confident unlabelled pixels.
- :class:`GeneratedPairsTerm` (``generated_weight``): the segmenter trained on images its
  reconstruction decoder generates from the prior with the batch's class layout.
- :class:`ObjectTerm` (``object_weight``, with a class named ``boundary``): the object heads'
  extent and distance losses and a boundary-aware loss on the boundary class (field
  delineation, as in ResUNet-a).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geovae.model.discriminator import PatchDiscriminator, adversarial_losses
from geovae.model.losses import mixture_nll, object_targets, tanimoto_loss
from geovae.model.vae import VAEOutput, VAESegmenter, class_argmax

__all__ = [
    "AdversarialTerm",
    "GeneratedPairsTerm",
    "LossTerm",
    "ObjectTerm",
    "PseudoLabelTerm",
    "Step",
    "build_terms",
    "object_channels",
]


@dataclass(frozen=True)
class Step:
    """What one training step gives the loss terms.

    Attributes:
        model: the segmenter being trained.
        out: its :meth:`~geovae.model.vae.VAESegmenter.forward_all` output.
        image: (B, C, H, W) the normalised input.
        mask: (B, H, W) class indices, ``ignore_index`` where unlabelled.
        valid: (B, H, W) bool, False at nodata pixels.
        base: the base loss's terms (:func:`~geovae.model.losses.vae_segmentation_loss`).
        step: the optimisation step (0-based).
        class_weight: (K,) cross-entropy weights, or None.
    """

    model: VAESegmenter
    out: VAEOutput
    image: Tensor
    mask: Tensor
    valid: Tensor
    base: Mapping[str, Tensor]
    step: int
    class_weight: Tensor | None


class LossTerm:
    """A term added to the loss of every training step from step ``start`` on.

    Args:
        weight: the term's weight in the loss.
        start: the first optimisation step the term contributes to.
    """

    def __init__(self, weight: float, start: int) -> None:
        self.weight = float(weight)
        self.start = int(start)

    def modules(self) -> dict[str, nn.Module]:
        """The modules this term trains, by the attribute name the task registers them under."""
        return {}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser groups of their own (other settings than the model's), given the model's ``lr``."""
        return []

    def __call__(self, s: Step) -> tuple[Tensor, dict[str, Tensor]] | None:
        """The weighted contribution to the loss and the values to log, or None (inactive).

        Args:
            s: the training step.
        """
        raise NotImplementedError


class AdversarialTerm(LossTerm):
    """The PatchGAN critic's hinge loss and, from ``start`` on, the decoder's adversarial term.

    The critic (:class:`~geovae.model.discriminator.PatchDiscriminator`) trains from the first
    step on real patches against reconstructions. The decoder's term is scaled by
    ``weight * ||grad recon|| / ||grad adv||`` at the decoder's last layer (the VQGAN rule), so
    the two stay balanced whatever their raw scales. Nodata pixels are set to 0 (the band
    mean) in both the real and the rebuilt patch, so the critic cannot tell them apart by the
    fill. The decoder's term is computed with the critic's parameters frozen and the critic's
    on detached reconstructions, so one backward pass gives each player only its own
    gradient; the critic is a second parameter group of the same optimiser (its own learning
    rate, no weight decay, GAN betas), so one step updates both.

    Args:
        in_channels: bands of the images judged.
        weight: ``adversarial``.
        start: ``adversarial_start``.
        recon_weight: the reconstruction term's weight in the base loss.
        lr: the critic's learning rate (None: the model's).
    """

    def __init__(self, in_channels: int, weight: float, start: int, recon_weight: float, lr: float | None) -> None:
        super().__init__(weight, start)
        self.critic = PatchDiscriminator(in_channels, base_channels=16, n_layers=3)
        self.recon_weight = float(recon_weight)
        self.lr = lr

    def modules(self) -> dict[str, nn.Module]:
        """The critic, as ``discriminator``."""
        return {"discriminator": self.critic}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The critic's group."""
        return [
            {
                "params": list(self.critic.parameters()),
                "lr": self.lr or lr,
                "weight_decay": 0.0,
                "betas": (0.5, 0.9),
            }
        ]

    def __call__(self, s: Step) -> tuple[Tensor, dict[str, Tensor]]:
        """``d_loss + balanced weight * g_loss``; logs ``d_loss``, ``g_loss``, ``d_accuracy``, ``adv_weight``."""
        rec = s.out.reconstruction
        v = s.valid[:, None].to(rec.dtype)
        real, fake = s.image * v, rec * v
        d = adversarial_losses(self.critic, real, fake)
        g_loss = d["g_loss"]
        weight = torch.zeros((), device=rec.device)
        if s.step >= self.start and torch.is_grad_enabled():
            last = _last_decoder_weight(s.model)
            g_rec = torch.autograd.grad(s.base["recon"] * self.recon_weight, last, retain_graph=True)[0]
            g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
            weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.weight
        logs = {"d_loss": d["d_loss"], "g_loss": g_loss, "d_accuracy": d["d_accuracy"], "adv_weight": weight}
        return d["d_loss"] + weight * g_loss, {k: t.detach() for k, t in logs.items()}


def _last_decoder_weight(model: VAESegmenter) -> Tensor:
    dec = model.recon_decoder
    layer = dec[-1] if isinstance(dec, nn.Sequential) else dec.out
    assert isinstance(layer, nn.Conv2d)
    return layer.weight


class PseudoLabelTerm(LossTerm):
    """Self-training: an unlabelled valid pixel whose mean class probability over the latent
    samples exceeds ``threshold`` is trained towards that class (the mixture likelihood).

    Args:
        weight: ``pseudo_label``.
        start: the first step (the end of the KL warm-up).
        threshold: ``pseudo_threshold``.
        ignore_index: mask value of unlabelled pixels.
    """

    def __init__(self, weight: float, start: int, threshold: float, ignore_index: int) -> None:
        super().__init__(weight, start)
        self.threshold = float(threshold)
        self.ignore_index = int(ignore_index)

    def __call__(self, s: Step) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Needs several latent samples per step (``train_samples`` > 1); logs ``pseudo``."""
        sample_logits = s.out.sample_logits
        if s.step < self.start or sample_logits is None:
            return None
        with torch.no_grad():
            q = sample_logits.float().softmax(2).mean(0)
            conf, target = q.max(1)
            w = (s.mask == self.ignore_index) & s.valid & (conf > self.threshold)
        loss = (
            sample_logits.sum() * 0.0 if not bool(w.any()) else mixture_nll(sample_logits.float(), target, w.float(), 1)
        )
        return self.weight * loss, {"pseudo": loss.detach()}


class GeneratedPairsTerm(LossTerm):
    """The segmenter's cross-entropy on images decoded from latent prior samples with the
    batch's class layout (labels where labelled, the model's classes elsewhere), over the
    labelled pixels.

    The images are data (no gradient reaches the decoder) and do not move BatchNorm's running
    statistics (they are not scenes). Needs the class-conditional reconstruction decoder.

    Args:
        weight: ``generated_weight``.
        start: the first step (the end of the KL warm-up).
        ignore_index: mask value of unlabelled pixels.
        samples: latent samples per generated image (``train_samples``).
    """

    def __init__(self, weight: float, start: int, ignore_index: int, samples: int) -> None:
        super().__init__(weight, start)
        self.ignore_index = int(ignore_index)
        self.samples = int(samples)

    def __call__(self, s: Step) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Logs ``generated``."""
        if s.step < self.start:
            return None
        loss = self._loss(s)
        return self.weight * loss, {"generated": loss.detach()}

    def _loss(self, s: Step) -> Tensor:
        model, out, mask = s.model, s.out, s.mask
        labelled = (mask != self.ignore_index) & s.valid
        dec = model.recon_decoder
        if isinstance(dec, nn.Sequential) or not bool(labelled.any()):  # a decoder given no class
            return out.logits.sum() * 0.0
        with torch.no_grad():
            layout = torch.where(labelled, mask, class_argmax(out.logits.detach()))
            xg = dec.decode(dec.features(torch.randn_like(out.mu)), layout)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.momentum = 0.0
        try:
            og = model.forward_all(xg, sample=True, samples=self.samples)
        finally:
            for m, mom in zip(bns, saved, strict=True):
                m.momentum = mom
        logits = og.sample_logits if og.sample_logits is not None else og.logits[None]
        target = torch.where(labelled, mask, torch.zeros_like(mask))
        cw = s.class_weight[target] if s.class_weight is not None else torch.ones_like(xg[:, 0])
        return mixture_nll(logits.float(), target, cw * labelled, 1)


def object_channels(labels: Sequence[str] | None) -> tuple[int, list[int]] | None:
    """``(boundary index, object indices)`` of a model's class names, or None without a class
    named ``boundary``: the objects are every other class but one named ``background``."""
    from geovae.objects import BACKGROUND_NAME, BOUNDARY_NAME

    names = [str(n).lower() for n in labels or ()]
    if BOUNDARY_NAME not in names:
        return None
    b = names.index(BOUNDARY_NAME)
    objects = [i for i, n in enumerate(names) if i != b and n != BACKGROUND_NAME]
    return (b, objects) if objects else None


class ObjectTerm(LossTerm):
    """The object heads' losses (field delineation, ResUNet-a's multitask loss).

    On every labelled pixel, three Tanimoto losses with complement
    (:func:`~geovae.model.losses.tanimoto_loss`): the extent map against the object area (object
    and boundary classes), the distance map against each object's distance to its outline
    normalised per object (:func:`~geovae.model.losses.object_targets`), and the boundary
    class's probability against the boundary pixels (a boundary-aware loss: the boundary is a
    few percent of the pixels, which cross-entropy alone lets the model neglect); plus the
    binary cross-entropy of both maps, which gives the Tanimoto terms a steady gradient early.
    The targets follow the augmented mask, so they turn with the image.

    Args:
        weight: the term's weight.
        boundary: the boundary class's index.
        objects: the object classes' indices.
        ignore_index: the mask value of unlabelled pixels.
    """

    def __init__(self, weight: float, boundary: int, objects: Sequence[int], ignore_index: int) -> None:
        super().__init__(weight, 0)
        self.boundary = int(boundary)
        self.objects = torch.tensor(list(objects), dtype=torch.long)
        self.ignore_index = int(ignore_index)

    def __call__(self, s: Step) -> tuple[Tensor, dict[str, Tensor]] | None:
        maps = s.out.object_maps
        if maps is None:
            return None
        labelled = ((s.mask != self.ignore_index) & s.valid).float()
        if not bool(labelled.any()):
            return None
        extent, distance = object_targets(s.mask, self.objects.to(s.mask.device), self.boundary)
        p = maps.float().sigmoid()
        bce = F.binary_cross_entropy_with_logits
        n = labelled.sum()
        ext = (
            tanimoto_loss(p[:, 0], extent, labelled)
            + (bce(maps[:, 0].float(), extent, reduction="none") * labelled).sum() / n
        )
        dist = (
            tanimoto_loss(p[:, 1], distance, labelled)
            + (bce(maps[:, 1].float(), distance, reduction="none") * labelled).sum() / n
        )
        pb = s.out.logits.float().softmax(1)[:, self.boundary]
        bnd = tanimoto_loss(pb, (s.mask == self.boundary).float(), labelled)
        loss = ext + dist + bnd
        return self.weight * loss, {"extent": ext.detach(), "distance": dist.detach(), "boundary": bnd.detach()}


def build_terms(hp: Mapping[str, Any]) -> list[LossTerm]:
    """The extra terms a task's arguments select, in the order they are added to the loss.

    The critic's weights are drawn here, after the model's (and the posterior's): the same
    seed gives the same run.

    Args:
        hp: the task's hyperparameters (every argument of its signature).

    Returns:
        The terms with a positive weight.
    """
    warmup = int(hp["kl_warmup_steps"])
    ii = int(hp["ignore_index"])
    terms: list[LossTerm] = []
    if float(hp["adversarial"]) > 0:
        start = warmup if hp["adversarial_start"] is None else int(hp["adversarial_start"])
        terms.append(
            AdversarialTerm(hp["in_channels"], hp["adversarial"], start, hp["recon_weight"], hp["adversarial_lr"])
        )
    if float(hp["pseudo_label"]) > 0:
        terms.append(PseudoLabelTerm(hp["pseudo_label"], warmup, hp["pseudo_threshold"], ii))
    if float(hp["generated_weight"]) > 0:
        terms.append(GeneratedPairsTerm(hp["generated_weight"], warmup, ii, hp["train_samples"]))
    chans = object_channels(hp.get("labels"))
    if chans is not None and float(hp.get("object_weight", 0.0)) > 0:
        terms.append(ObjectTerm(hp["object_weight"], chans[0], chans[1], ii))
    return terms
