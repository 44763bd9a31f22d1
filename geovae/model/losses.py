"""Losses of the VAE segmenter, with one reduction convention for all of them.

Every term is expressed **per input pixel**, so that their weights mean the same thing at any
tile size, batch size and network stride:

- ``ce``: cross-entropy averaged over labelled pixels (nats per labelled pixel);
- ``dice``: 1 - soft Dice over labelled pixels, averaged over the classes present;
- ``recon``: squared error of the reconstruction in normalised units, averaged over bands and
  valid pixels (independent of the band count, so 6 and 224 bands need the same weight).
  With a class-conditional reconstruction decoder (``out.class_errors``), a labelled pixel's
  error is the one given its label and an unlabelled pixel's is the expectation over the
  predicted class probabilities, ``sum_k q(k|x) err_k`` (the semi-supervised VAE's bound for
  unlabelled data, Kingma et al. 2014); that expectation is what lets unlabelled pixels train
  the classifier;
- ``kl``: KL(q(z|x) || N(0, I)) **summed** over latent channels and latent positions, divided
  by the number of input pixels, averaged over the batch (nats per input pixel).

Why the KL is divided by pixels, not by latent positions: each latent cell covers
``stride**2`` pixels. The evidence lower bound sums the data terms over pixels and the KL over
latent cells; dividing both by the same pixel count keeps their ratio, so ``beta = 1`` is the
ELBO's own balance. Averaging the KL per latent cell instead (a common slip) weighs it
``stride**2`` (256 at depth 4) times too heavily against the per-pixel means: the optimiser
then drives q(z|x) to the prior everywhere and the latent collapses silently (KL ~ 0, every
sample identical). The opposite slip (data terms summed, KL averaged) makes the prior
irrelevant. ``kl_per_channel`` is reported per latent cell (nats), the unit free bits use,
so a collapsed channel is visible as a value near 0 in the logs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from geovae.model.vae import VAEOutput

#: PyTorch's own default for unlabelled pixels; the training task may pass another value.
DEFAULT_IGNORE_INDEX = -100


def kl_divergence_map(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) at each latent cell and channel, in nats.

    Args:
        mu: (B, L, h, w) latent mean.
        logvar: (B, L, h, w) latent log-variance.

    Returns:
        (B, L, h, w) non-negative KL.
    """
    mu = mu.float()
    logvar = logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_gaussians(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) at each cell and channel, in nats."""
    mu_q, logvar_q, mu_p, logvar_p = (t.float() for t in (mu_q, logvar_q, mu_p, logvar_p))
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0)


def kl_warmup(step: int, warmup_steps: int, beta_max: float = 1.0) -> float:
    """Linear KL warm-up: beta rises from 0 to ``beta_max`` over ``warmup_steps`` steps.

    Starting with a small beta lets the decoders learn to use the latent before the prior
    pulls it in, the usual remedy (with free bits) against posterior collapse.

    Args:
        step: the current optimisation step (0-based).
        warmup_steps: steps to reach ``beta_max``; 0 or less means no warm-up.
        beta_max: the final KL weight.

    Returns:
        The KL weight for this step.
    """
    if warmup_steps <= 0:
        return float(beta_max)
    return float(beta_max) * min(1.0, max(0, step) / warmup_steps)


def _mask_index(mask: Tensor) -> Tensor:
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"mask must be (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
        mask = mask[:, 0]
    return mask.long()


def _valid_map(valid: Tensor | None, like: Tensor) -> Tensor:
    """(B, H, W) bool of valid pixels (all valid when None)."""
    if valid is None:
        return torch.ones(like.shape[0], *like.shape[-2:], dtype=torch.bool, device=like.device)
    if valid.ndim == 4:
        valid = valid.all(dim=1)
    return valid.to(device=like.device, dtype=torch.bool)


def mixture_nll(sample_logits: Tensor, target: Tensor, weights: Tensor, region: int = 1) -> Tensor:
    """Negative log-likelihood of the labels under the mixture of S sampled segmentations.

    ``-sum_r log mean_s exp(sum_{i in r} w_i log p_s(y_i)) / sum_i w_i`` over square regions
    ``r`` of ``region`` pixels a side (0: the whole tile). With ``region = 1`` this is the
    per-pixel predictive likelihood of the sample mean; larger regions score the samples'
    joint labelling of each region.

    Args:
        sample_logits: (S, B, K, H, W).
        target: (B, H, W) class indices (any value where ``weights`` is 0).
        weights: (B, H, W) per-pixel weights, 0 at unlabelled pixels.
        region: side of the joint regions in pixels (0: whole tile).

    Returns:
        Scalar, nats per (weighted) labelled pixel; 0 when nothing is labelled.
    """
    s, b, _k, h, w = sample_logits.shape
    logp = sample_logits.log_softmax(2).gather(2, target[None, :, None].expand(s, b, 1, h, w))[:, :, 0]
    ll = logp * weights.unsqueeze(0)  # (S, B, H, W)
    if region == 0:
        joint = ll.sum(dim=(2, 3))  # (S, B)
    elif region == 1:
        joint = ll
    else:
        joint = F.avg_pool2d(ll, region, stride=region, ceil_mode=True) * float(region * region)
    mix = torch.logsumexp(joint, dim=0) - math.log(s)
    return -mix.sum() / weights.sum().clamp_min(1e-8)


def soft_dice_loss(logits: Tensor, target: Tensor, labelled: Tensor, eps: float = 1.0) -> Tensor:
    """1 - mean soft Dice over the classes present in the labelled pixels.

    Args:
        logits: (B, K, H, W).
        target: (B, H, W) class indices (any value where ``labelled`` is False).
        labelled: (B, H, W) bool, which pixels count.
        eps: smoothing added to numerator and denominator.

    Returns:
        A scalar; 0 when no pixel is labelled.
    """
    k = logits.shape[1]
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    p = logits.float().softmax(1).permute(0, 2, 3, 1)[labelled]  # (N, K)
    t = F.one_hot(target[labelled].clamp(0, k - 1), k).float()
    inter = (p * t).sum(0)
    denom = p.sum(0) + t.sum(0)
    dice = (2 * inter + eps) / (denom + eps)
    present = t.sum(0) > 0
    return 1.0 - dice[present].mean()


def vae_segmentation_loss(
    out: VAEOutput,
    image: Tensor,
    mask: Tensor | None,
    *,
    valid: Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    beta: float = 1.0,
    free_bits: float = 0.0,
    recon_weight: float = 1.0,
    dice_weight: float = 0.0,
    class_weights: Tensor | None = None,
    mixture_region: int = 1,
    sample_entropy: float = 0.0,
    prior_weight: float = 0.1,
) -> dict[str, Tensor]:
    """The training loss: ``ce + dice_weight*dice + recon_weight*recon + beta*kl_free_bits``.

    See the module docstring for the per-pixel reduction convention. Pixels whose label is
    ``ignore_index`` (or that are not ``valid``) add nothing to ``ce`` and ``dice``, yet still
    train ``recon`` and ``kl``: a tile without a single label is a useful semi-supervised
    sample, and gives ``ce == 0`` (never NaN).

    Args:
        out: the model's :meth:`VAESegmenter.forward_all` output.
        image: (B, C, H, W) the normalised input (the reconstruction target).
        mask: (B, H, W) or (B, 1, H, W) class indices 0..K-1, ``ignore_index`` for unlabelled
            pixels; None for an unlabelled batch.
        valid: (B, H, W) or (B, C, H, W) bool, False at nodata pixels (excluded from every
            pixel term); None means all valid.
        ignore_index: label value of unlabelled pixels. The default is PyTorch's -100; the
            training task passes its own.
        beta: KL weight (see :func:`kl_warmup`).
        free_bits: nats per latent channel per latent cell below which that channel's KL is
            not penalised (its gradient is zero), so the model can afford to use each channel.
            Applied to the batch-mean KL of each channel.
        recon_weight: weight of the reconstruction term.
        dice_weight: weight of the soft-Dice term (0 turns it off; it is still reported).
        class_weights: (K,) per-class weights for the cross-entropy; the mean is then
            weighted (sum of weighted losses over the sum of the labelled pixels' weights).
        mixture_region: with several latent samples (``out.sample_logits``), ``ce`` is the
            negative log-likelihood of the labels under the *mixture* of the samples, taken
            jointly over square regions of this many pixels a side: ``-log mean_s
            prod_{i in region} p_s(y_i)``. 1 is the per-pixel mixture (no reward for samples
            that differ); larger regions reward samples that commit, each coherently, to a
            different plausible labelling of the region (a stochastic segmentation network's
            objective, made local). 0 takes the whole tile as one region.
        sample_entropy: weight of the mean entropy of each sample's class probabilities over
            valid pixels (``sample_entropy`` term; needs several samples). Penalising it while
            the mixture likelihood keeps the samples' *mean* calibrated makes each sample
            commit to a class where the mean is unsure, so the samples disagree exactly there
            (their mutual information approaches the predictive entropy).
        prior_weight: with a label-aware posterior (``out.q_mu``), the weight of
            KL(p(z | x) || N(0, I)) that keeps the learned prior near the generator's N(0, I).

    Returns:
        Scalar tensors ``loss``, ``ce``, ``dice``, ``recon``, ``kl`` (raw, per input pixel),
        ``kl_free_bits`` (the term that enters the loss, per input pixel), ``kl_per_channel``
        ((L,) nats per latent cell, before free bits), ``labelled_fraction``.
    """
    logits = out.logits.float()
    b, k, h, w = logits.shape
    valid_px = _valid_map(valid, logits)

    if mask is None:
        target = torch.full((b, h, w), ignore_index, dtype=torch.long, device=logits.device)
    else:
        target = _mask_index(mask).to(logits.device)
    labelled = valid_px & (target != ignore_index)
    # Out-of-range labels would make cross_entropy fail on CUDA with an opaque device assert.
    safe_target = torch.where(labelled, target, torch.zeros_like(target))
    if bool(labelled.any()) and (int(safe_target.max()) >= k or int(safe_target.min()) < 0):
        raise ValueError(f"mask holds class indices outside 0..{k - 1} (and not ignore_index={ignore_index})")

    lab_f = labelled.float()
    if class_weights is not None:
        cw = class_weights.to(logits.device, torch.float32)[safe_target] * lab_f
    else:
        cw = lab_f
    s_ent = logits.new_zeros(())
    if out.sample_logits is not None and out.sample_logits.shape[0] > 1:
        sl = out.sample_logits.float()
        ce = mixture_nll(sl, safe_target, cw, mixture_region)
        logq = sl.log_softmax(2)
        qs = logq.exp()
        q = qs.mean(0)
        if sample_entropy > 0:
            ent = -(qs * logq).sum(2).mean(0)  # (B, H, W)
            s_ent = (ent * valid_px).sum() / valid_px.sum().clamp_min(1)
    else:
        per_px = F.cross_entropy(logits, safe_target, reduction="none")  # (B, H, W)
        ce = (per_px * cw).sum() / cw.sum().clamp_min(1e-8)
        q = None

    dice = soft_dice_loss(logits, safe_target, labelled)

    if out.class_errors is not None:
        errs = out.class_errors.float()
        q = logits.softmax(1) if q is None else q
        given_label = errs.gather(1, safe_target[:, None])[:, 0]
        sq = torch.where(labelled, given_label, (q * errs).sum(1))
    else:
        rec = out.reconstruction.float()
        sq = (rec - image.float()).pow(2).mean(dim=1)  # mean over bands: (B, H, W)
    vf = valid_px.float()
    recon = (sq * vf).sum() / vf.sum().clamp_min(1.0)

    prior_kl = logits.new_zeros(())
    if out.q_mu is not None and out.q_logvar is not None:
        # Probabilistic U-Net: z came from q(z | x, y); the KL is to the segmenter's prior
        # p(z | x), and that prior is held near N(0, I) (so that generation still decodes
        # N(0, I) samples) by a second KL, per input pixel like the first.
        kl_map = kl_gaussians(out.q_mu, out.q_logvar, out.mu, out.logvar)
        pk = kl_divergence_map(out.mu, out.logvar)
        prior_kl = pk.mean(dim=(0, 2, 3)).sum() * (pk.shape[-2] * pk.shape[-1]) / (h * w)
    else:
        kl_map = kl_divergence_map(out.mu, out.logvar)  # (B, L, h', w')
    cells = kl_map.shape[-2] * kl_map.shape[-1]
    pixels_per_cell = (h * w) / cells
    kl_per_channel = kl_map.mean(dim=(0, 2, 3))  # nats per latent cell
    kl = kl_per_channel.sum() / pixels_per_cell
    if free_bits > 0:
        kl_fb = torch.clamp(kl_per_channel, min=free_bits).sum() / pixels_per_cell
    else:
        kl_fb = kl

    loss = (
        ce + dice_weight * dice + recon_weight * recon + beta * kl_fb + sample_entropy * s_ent + prior_weight * prior_kl
    )
    return {
        "loss": loss,
        "ce": ce,
        "dice": dice,
        "recon": recon,
        "kl": kl,
        "kl_free_bits": kl_fb,
        "kl_per_channel": kl_per_channel,
        "labelled_fraction": lab_f.mean(),
        "sample_entropy": s_ent,
        "prior_kl": prior_kl,
    }


@torch.no_grad()
def sample_diversity(sample_probs: Tensor) -> Tensor:
    """How much latent samples disagree: a collapse monitor.

    Args:
        sample_probs: (n, B, K, H, W) class probabilities of ``n >= 2`` latent samples.

    Returns:
        Scalar: the mean over pixels of the total-variation distance between each sample
        and the sample mean, in [0, 1]. Near 0 means the latent no longer changes the
        segmentation (collapse or a head that ignores z).
    """
    if sample_probs.shape[0] < 2:
        return sample_probs.new_zeros(())
    mean = sample_probs.mean(0, keepdim=True)
    return 0.5 * (sample_probs - mean).abs().sum(dim=2).mean()


# ----------------------------------------------------------------------------- object heads
def tanimoto_loss(p: Tensor, t: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - the Tanimoto coefficient with complement (ResUNet-a, Diakogiannis et al. 2020).

    ``T(p, t) = sum(p t) / sum(p^2 + t^2 - p t)`` over the weighted pixels, averaged with the
    same of ``1 - p`` and ``1 - t``, so a thin target (a boundary a pixel or two wide) weighs
    as much as its large complement and an empty target still has a gradient.

    Args:
        p: predictions in 0..1, any shape.
        t: targets in 0..1, the same shape.
        w: pixel weights (0 leaves a pixel out), the same shape.
        eps: smoothing of the denominators.

    Returns:
        A scalar in 0..1; 0 when no pixel has weight.
    """
    p, t, w = p.float(), t.float(), w.float()

    def coefficient(a: Tensor, b: Tensor) -> Tensor:
        ab = (w * a * b).sum()
        return (ab + eps) / ((w * (a * a + b * b - a * b)).sum() + eps)

    return 1.0 - 0.5 * (coefficient(p, t) + coefficient(1.0 - p, 1.0 - t))


def object_targets(mask: Tensor, objects: Tensor, boundary: int) -> tuple[Tensor, Tensor]:
    """The object heads' targets of a batch of class masks: extent and normalised distance.

    Args:
        mask: (B, H, W) class indices (any value where unlabelled).
        objects: (n,) the object classes' indices.
        boundary: the boundary class's index.

    Returns:
        ``(extent, distance)``, (B, H, W) float32 each: extent 1 on object and boundary
        pixels; distance the Euclidean distance of an object pixel to the nearest pixel that
        is not of the object's interior (its boundary, the background, an unlabelled pixel),
        divided by the largest such distance in its 4-connected piece of interior, so 1 at
        each object's most interior pixel and 0 off objects. A piece cut by the patch's edge
        is normalised by what the patch holds of it.
    """
    from scipy import ndimage as ndi

    interior = torch.isin(mask, objects)
    extent = interior | (mask == boundary)
    inside = interior.cpu().numpy()
    dist = np.zeros(inside.shape, np.float32)
    cross = ndi.generate_binary_structure(2, 1)
    for i, m in enumerate(inside):
        if not m.any():
            continue
        d = ndi.distance_transform_edt(m)
        pieces, n = ndi.label(m, structure=cross)
        top = np.asarray(ndi.maximum(d, pieces, index=np.arange(n + 1)), np.float64)
        top[0] = 1.0
        dist[i] = d / top[pieces]
    return extent.float(), torch.from_numpy(dist).to(mask.device)
