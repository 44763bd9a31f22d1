"""An optional PatchGAN critic for the reconstruction (VAE-GAN style), off by default.

A squared-error reconstruction from a narrow latent is blurry; a patch discriminator that
judges local texture pushes the reconstruction decoder towards sharp, realistic patches.
It only changes the reconstruction branch's training signal, never the segmentation at
predict time, and geovae does not save it in the model file.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

#: The adversarial loss: hinge (stable) or binary cross-entropy (the original GAN loss).
AdversarialLoss = Literal["hinge", "bce"]
ADVERSARIAL_LOSSES: tuple[AdversarialLoss, ...] = get_args(AdversarialLoss)


class PatchDiscriminator(nn.Module):
    """A PatchGAN (pix2pix) critic: one real/fake logit per overlapping input patch.

    Fully convolutional, so any band count and tile size work. Unlike pix2pix it has no
    BatchNorm: real and fake batches pass separately, and per-batch statistics would
    normalise away exactly the contrast and texture differences the critic must see.

    Args:
        in_channels: number of bands of the images judged.
        base_channels: width of the first layer (doubles per layer, capped at 8x).
        n_layers: stride-2 layers; the receptive field is about 16 * 2**(n_layers - 1) px.
    """

    def __init__(self, in_channels: int, base_channels: int = 32, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        c = base_channels
        for i in range(1, n_layers):
            c_out = base_channels * min(2**i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            c = c_out
        layers += [nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits.

        Args:
            x: (B, C, H, W) images.

        Returns:
            (B, 1, h, w) logits, positive for "real".
        """
        return self.net(x)


def adversarial_losses(
    discriminator: PatchDiscriminator, real: Tensor, fake: Tensor, *, mode: AdversarialLoss = "hinge"
) -> dict[str, Tensor]:
    """Discriminator and generator losses for one batch.

    ``d_loss`` sees ``fake`` detached, so its gradient reaches only the critic; ``g_loss`` is
    computed with the critic's parameters frozen, so its gradient reaches only the generator.
    ``d_loss + weight * g_loss`` can therefore be added to the VAE loss and stepped by one
    optimiser holding both players' parameters: a simultaneous update of both.

    Args:
        discriminator: the critic.
        real: (B, C, H, W) input images (normalised), the "real" samples.
        fake: (B, C, H, W) reconstructions, the "fake" samples.
        mode: ``"hinge"`` (the default, stable) or ``"bce"`` (the original GAN loss).

    Returns:
        ``d_loss``, ``g_loss`` and ``d_accuracy`` (share of patches the critic gets right).

    Raises:
        ValueError: an unknown ``mode``.
    """
    d_real = discriminator(real.detach())
    d_fake = discriminator(fake.detach())
    trainable = [p for p in discriminator.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        g_fake = discriminator(fake)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    if mode == "hinge":
        d_loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        g_loss = -g_fake.mean()
    elif mode == "bce":
        d_loss = F.binary_cross_entropy_with_logits(
            d_real, d_real.new_ones(d_real.shape)
        ) + F.binary_cross_entropy_with_logits(d_fake, d_fake.new_zeros(d_fake.shape))
        g_loss = F.binary_cross_entropy_with_logits(g_fake, g_fake.new_ones(g_fake.shape))
    else:
        raise ValueError(f"mode={mode!r}: use {' or '.join(map(repr, ADVERSARIAL_LOSSES))}")
    acc = 0.5 * ((d_real > 0).float().mean() + (d_fake <= 0).float().mean())
    return {"d_loss": d_loss, "g_loss": g_loss, "d_accuracy": acc.detach()}
