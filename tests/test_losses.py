"""Losses: ignore_index, masked reconstruction, KL reduction, free bits, warm-up."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from geovae.model import VAEOutput, kl_warmup, sample_diversity, vae_segmentation_loss
from geovae.model.losses import kl_divergence_map, soft_dice_loss


def _out(
    b: int = 2, k: int = 3, c: int = 4, h: int = 16, w: int = 16, s: int = 4, seed: int = 0
) -> tuple[VAEOutput, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = VAEOutput(
        logits=torch.randn(b, k, h, w, generator=g, requires_grad=True),
        reconstruction=torch.randn(b, c, h, w, generator=g, requires_grad=True),
        mu=torch.randn(b, 8, h // s, w // s, generator=g, requires_grad=True),
        logvar=(0.1 * torch.randn(b, 8, h // s, w // s, generator=g)).requires_grad_(True),
    )
    image = torch.randn(b, c, h, w, generator=g)
    return out, image


def test_all_ignored_batch_is_finite_and_still_trains_recon_and_kl() -> None:
    out, image = _out()
    mask = torch.full((2, 16, 16), 255)
    d = vae_segmentation_loss(out, image, mask, ignore_index=255)
    assert d["ce"].item() == 0.0 and d["dice"].item() == 0.0
    assert torch.isfinite(d["loss"])
    d["loss"].backward()
    assert out.logits.grad is not None and out.logits.grad.abs().sum() == 0
    assert out.reconstruction.grad.abs().sum() > 0
    assert out.mu.grad.abs().sum() > 0
    # No mask at all is the same as all-ignored.
    out2, _ = _out()
    assert torch.isclose(vae_segmentation_loss(out2, image, None)["loss"], d["loss"])


def test_ce_equals_torch_mean_over_labelled_pixels() -> None:
    out, image = _out()
    g = torch.Generator().manual_seed(3)
    mask = torch.randint(0, 3, (2, 1, 16, 16), generator=g)
    mask[:, :, :5] = -100
    d = vae_segmentation_loss(out, image, mask)
    ref = F.cross_entropy(out.logits, mask[:, 0], ignore_index=-100)
    assert torch.isclose(d["ce"], ref, atol=1e-6)
    w = torch.tensor([1.0, 2.0, 0.5])
    dw = vae_segmentation_loss(out, image, mask, class_weights=w)
    assert torch.isclose(dw["ce"], F.cross_entropy(out.logits, mask[:, 0], weight=w, ignore_index=-100), atol=1e-6)
    assert d["labelled_fraction"].item() == pytest.approx(11 / 16)


def test_out_of_range_labels_are_refused() -> None:
    out, image = _out()
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        vae_segmentation_loss(out, image, torch.full((2, 16, 16), 5))


def test_reconstruction_is_masked_to_valid_pixels() -> None:
    out, image = _out()
    valid = torch.zeros(2, 16, 16, dtype=torch.bool)
    valid[:, :8] = True
    d = vae_segmentation_loss(out, image, None, valid=valid)
    ref = (out.reconstruction - image)[:, :, :8].pow(2).mean()
    assert torch.isclose(d["recon"], ref, atol=1e-6)
    # Garbage in the invalid half changes nothing.
    image2 = image.clone()
    image2[:, :, 8:] = 1e6
    assert torch.isclose(vae_segmentation_loss(out, image2, None, valid=valid)["recon"], ref, atol=1e-6)
    # Invalid pixels are not labelled either.
    mask = torch.zeros(2, 16, 16, dtype=torch.long)
    d2 = vae_segmentation_loss(out, image, mask, valid=valid)
    ce_ref = F.cross_entropy(out.logits[:, :, :8], mask[:, :8])
    assert torch.isclose(d2["ce"], ce_ref, atol=1e-6)


def test_kl_reduction_is_per_input_pixel() -> None:
    out, image = _out(s=4)
    d = vae_segmentation_loss(out, image, None)
    mu, lv = out.mu.detach(), out.logvar.detach()
    per_cell = 0.5 * (mu**2 + lv.exp() - 1 - lv)
    # Sum over channels and cells, divided by pixels (16 per cell), mean over the batch.
    expected = per_cell.sum(dim=(1, 2, 3)).mean() / (16 * 16)
    assert torch.isclose(d["kl"], expected, atol=1e-6)
    assert torch.allclose(d["kl_per_channel"], per_cell.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.isclose(d["kl_per_channel"].sum() / 16, d["kl"], atol=1e-6)
    # The KL of the prior itself is zero.
    z = torch.zeros(1, 2, 3, 3)
    assert kl_divergence_map(z, z).abs().max() == 0


def test_free_bits_floor_each_channel_and_stop_its_gradient() -> None:
    out, image = _out()
    mu = torch.zeros(2, 8, 4, 4)
    mu[:, 0] = 3.0  # channel 0 carries 4.5 nats per cell, the others nothing
    out = out._replace(mu=mu.requires_grad_(True), logvar=torch.zeros(2, 8, 4, 4, requires_grad=True))
    d = vae_segmentation_loss(out, image, None, free_bits=1.0, recon_weight=0.0)
    assert d["kl_per_channel"][0].item() == pytest.approx(4.5)
    assert d["kl"].item() == pytest.approx(4.5 / 16)
    assert d["kl_free_bits"].item() == pytest.approx((4.5 + 7 * 1.0) / 16)
    d["kl_free_bits"].backward()
    g = out.mu.grad
    assert g[:, 0].abs().min() > 0  # above the floor: penalised
    assert g[:, 1:].abs().max() == 0  # below the floor: free


def test_beta_and_weights_combine_into_the_loss() -> None:
    out, image = _out()
    mask = torch.randint(0, 3, (2, 16, 16))
    d = vae_segmentation_loss(out, image, mask, beta=0.3, recon_weight=2.0, dice_weight=0.5)
    expect = d["ce"] + 0.5 * d["dice"] + 2.0 * d["recon"] + 0.3 * d["kl"]
    assert torch.isclose(d["loss"], expect, atol=1e-6)


def test_dice_is_zero_for_a_perfect_prediction() -> None:
    t = torch.randint(0, 3, (1, 8, 8))
    logits = 50 * F.one_hot(t, 3).permute(0, 3, 1, 2).float()
    lab = torch.ones(1, 8, 8, dtype=torch.bool)
    assert soft_dice_loss(logits, t, lab).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(-logits, t, lab).item() > 0.9


def test_kl_warmup() -> None:
    assert kl_warmup(0, 100, 2.0) == 0.0
    assert kl_warmup(50, 100, 2.0) == pytest.approx(1.0)
    assert kl_warmup(500, 100, 2.0) == 2.0
    assert kl_warmup(3, 0, 0.5) == 0.5


def test_sample_diversity() -> None:
    p = torch.softmax(torch.randn(1, 2, 3, 4, 4), 2).expand(3, -1, -1, -1, -1)
    assert sample_diversity(p).item() == pytest.approx(0.0, abs=1e-7)
    a = F.one_hot(torch.zeros(1, 4, 4, dtype=torch.long), 2).permute(0, 3, 1, 2).float()
    b = 1 - a
    assert sample_diversity(torch.stack([a, b])).item() == pytest.approx(0.5)
    assert math.isfinite(sample_diversity(p[:1]).item())


@pytest.mark.parametrize("mode", ["hinge", "bce"])
def test_patch_discriminator_learns_to_tell_blur_from_texture(mode: str) -> None:
    from geovae.model.discriminator import PatchDiscriminator, adversarial_losses

    torch.manual_seed(0)
    d = PatchDiscriminator(4, base_channels=8, n_layers=2)
    assert d(torch.zeros(2, 4, 32, 48)).shape == (2, 1, 8, 12)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    first = None
    for _ in range(40):
        real = torch.randn(4, 4, 32, 32)  # textured
        fake = F.avg_pool2d(real, 4, 1, padding=2)[..., :32, :32].requires_grad_(True)  # blurred
        terms = adversarial_losses(d, real, fake, mode=mode)
        first = first if first is not None else terms["d_loss"].item()
        opt.zero_grad()
        terms["d_loss"].backward()
        opt.step()
    assert terms["d_loss"].item() < 0.5 * first
    assert terms["d_accuracy"].item() > 0.9
    # The generator loss reaches the fake image; the discriminator loss does not.
    fake = torch.randn(2, 4, 32, 32, requires_grad=True)
    adversarial_losses(d, torch.randn(2, 4, 32, 32), fake, mode=mode)["d_loss"].backward()
    assert fake.grad is None
    adversarial_losses(d, torch.randn(2, 4, 32, 32), fake, mode=mode)["g_loss"].backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        adversarial_losses(d, fake, fake, mode="wgan")


def test_mixture_nll_per_pixel_equals_the_nll_of_the_mean_and_regions_score_jointly() -> None:
    from geovae.model.losses import mixture_nll

    torch.manual_seed(0)
    s = torch.randn(4, 2, 3, 8, 8) * 3
    y = torch.randint(0, 3, (2, 8, 8))
    w = torch.ones(2, 8, 8)
    w[0, :2] = 0  # unlabelled rows count nothing
    per_px = -(s.softmax(2).mean(0).gather(1, y[:, None])[:, 0].log() * w).sum() / w.sum()
    assert torch.isclose(mixture_nll(s, y, w, 1), per_px, atol=1e-5)
    # Identical samples: every region size gives the plain cross-entropy.
    same = s[:1].expand(4, -1, -1, -1, -1)
    ce = (torch.nn.functional.cross_entropy(s[0], y, reduction="none") * w).sum() / w.sum()
    for r in (1, 4, 0):
        assert torch.isclose(mixture_nll(same, y, w, r), ce, atol=1e-5)
    # Two samples that each get one half of a region right: per pixel the mixture is as good
    # as can be, jointly over the region it is worse (neither sample explains it all).
    y2 = torch.zeros(1, 2, 2, dtype=torch.long)
    y2[0, :, 1] = 1
    a = torch.tensor([10.0, -10.0]).view(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2)
    b = -a
    two = torch.cat([a, b])
    w2 = torch.ones(1, 2, 2)
    assert mixture_nll(two, y2, w2, 1) < mixture_nll(two, y2, w2, 2) - 1.0


def test_sample_entropy_term_rewards_samples_that_commit() -> None:
    from geovae.model.vae import VAEOutput

    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4)
    mu = torch.zeros(1, 1, 1, 1)
    soft = torch.zeros(2, 1, 2, 4, 4)  # two samples, both 50/50
    sharp = (
        torch.stack([torch.tensor([8.0, -8.0]), torch.tensor([-8.0, 8.0])]).view(2, 1, 2, 1, 1).expand(2, 1, 2, 4, 4)
    )
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    terms = {}
    for name, sl in (("soft", soft), ("sharp", sharp)):
        out = VAEOutput(sl[0], x, mu, mu, None, sl)
        terms[name] = vae_segmentation_loss(out, x, y, sample_entropy=1.0, recon_weight=0.0)
    # The same mean prediction (0.5/0.5), so the same mixture likelihood...
    assert torch.isclose(terms["soft"]["ce"], terms["sharp"]["ce"], atol=1e-4)
    # ...but only the committed samples escape the entropy penalty.
    assert terms["soft"]["sample_entropy"] > 0.69 and terms["sharp"]["sample_entropy"] < 1e-3
    assert terms["sharp"]["loss"] < terms["soft"]["loss"] - 0.6


def test_generator_term_does_not_train_the_critic() -> None:
    from geovae.model.discriminator import PatchDiscriminator, adversarial_losses

    torch.manual_seed(0)
    d = PatchDiscriminator(3, base_channels=8, n_layers=2)
    fake = torch.randn(2, 3, 32, 32, requires_grad=True)
    adversarial_losses(d, torch.randn(2, 3, 32, 32), fake)["g_loss"].backward()
    assert all(p.grad is None for p in d.parameters())
    assert all(p.requires_grad for p in d.parameters())
    assert fake.grad is not None and fake.grad.abs().sum() > 0
