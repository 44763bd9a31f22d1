"""The layers :class:`~geovae.model.vae.VAESegmenter` is built from.

The encoders (:class:`UNetEncoder`, built in; :class:`SmpEncoder`, a
segmentation_models_pytorch / timm encoder), the segmentation decoder's :class:`UpBlock`,
the class-conditional reconstruction decoder (:class:`ClassConditionalDecoder`) and the
low-rank stochastic head (:class:`LowRankHead`). Every one is convolutional with BatchNorm,
so a pixel's output depends only on its neighbourhood (module docstring of
:mod:`geovae.model.vae`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geovae.errors import OptionError


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """A ``kernel`` x ``kernel`` convolution (no bias: the BatchNorm has one), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def conv_bias(conv: nn.Conv2d) -> Tensor:
    """A convolution's bias: every convolution of the model whose bias is read is made with ``bias=True``."""
    assert conv.bias is not None
    return conv.bias


def stage_widths(base: int, depth: int) -> list[int]:
    """The channels of the full-resolution level and of each of the ``depth`` stages."""
    # Widths double once and then stay flat: deep levels are cheap in FLOPs but dominate the
    # parameter count, and a land-cover segmenter gains little from 256+ deep channels.
    return [base * min(2**i, 2) for i in range(depth + 1)]


class UNetEncoder(nn.Module):
    """A plain U-Net encoder: a full-resolution stem, then ``depth`` stride-2 stages."""

    def __init__(self, in_channels: int, base: int, depth: int) -> None:
        super().__init__()
        w = stage_widths(base, depth)
        self.out_channels = w
        self.stem = nn.Sequential(conv_bn_relu(in_channels, w[0]), conv_bn_relu(w[0], w[0]))
        self.stages = nn.ModuleList(
            nn.Sequential(conv_bn_relu(w[i], w[i + 1], stride=2), conv_bn_relu(w[i + 1], w[i + 1]))
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


class SmpEncoder(nn.Module):
    """A segmentation_models_pytorch / timm encoder, built without downloading weights."""

    def __init__(self, name: str, in_channels: int, depth: int, weights: None) -> None:
        super().__init__()
        try:
            import segmentation_models_pytorch as smp
        except ImportError as exc:  # pragma: no cover - smp is a dependency
            raise OptionError("encoder smp:...: segmentation_models_pytorch is not installed; pip install it") from exc
        try:
            self.encoder = smp.encoders.get_encoder(name, in_channels=in_channels, depth=depth, weights=weights)
        except (KeyError, ValueError) as exc:
            raise OptionError(
                f"encoder smp:{name}: not a segmentation_models_pytorch encoder; see smp.encoders.get_encoder_names()"
            ) from exc
        self.out_channels: list[int] = list(self.encoder.out_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        # feats[0] is the input itself at full resolution; the decoder uses it as its last skip.
        return list(self.encoder(x))


class UpBlock(nn.Module):
    """One decoder level: the deeper features upsampled to the skip's size, joined with it."""

    def __init__(self, c_deep: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        # A 1x1 mix of the concatenation before the 3x3 keeps two non-linearities per level
        # at about half the parameters of two 3x3 convolutions.
        self.conv = nn.Sequential(conv_bn_relu(c_deep + c_skip, c_out, kernel=1), conv_bn_relu(c_out, c_out))

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        up = F.interpolate(deep, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([up, skip], dim=1))


class ClassConditionalDecoder(nn.Module):
    """Rebuilds the bands from the latent map and a class per pixel.

    ``x̂_k = W relu(a + e_k) + b`` where ``a`` comes from ``z`` through the upsampling trunk
    and ``e_k`` is a learned vector per class: the semi-supervised VAE's generative model
    p(x | y, z) (Kingma et al., 2014, "M2"), made per pixel. The class adds only log2(K) bits
    per pixel, so the decoder stays a bottleneck and its error stays an anomaly score.
    """

    def __init__(self, trunk: nn.Sequential, width: int, num_classes: int, out_channels: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.mix = nn.Conv2d(width, width, 1)
        self.embed = nn.Parameter(torch.randn(num_classes, width) * 0.1)
        self.out = nn.Conv2d(width, out_channels, 1)

    def features(self, z: Tensor) -> Tensor:
        return self.mix(self.trunk(z))

    def decode(self, a: Tensor, classes: Tensor) -> Tensor:
        """(B, C, H, W) reconstruction for (B, H, W) class indices."""
        e = self.embed.to(a.dtype)[classes].permute(0, 3, 1, 2)
        return self.out(F.relu(a + e))

    def decode_mean(self, a: Tensor) -> Tensor:
        """The reconstruction averaged over classes with equal weight (no class known)."""
        return torch.stack([self.out(F.relu(a + e.to(a.dtype).view(1, -1, 1, 1))) for e in self.embed]).mean(0)

    def class_errors(self, a: Tensor, x: Tensor) -> Tensor:
        """(B, K, H, W) mean squared error over bands of every class's reconstruction.

        Expanded as ``|x - b|^2 - 2 (W^T (x - b)) . h + h^T (W^T W) h`` so that memory grows
        with the hidden width per class, not with the band count: exact marginalisation
        over classes stays cheap for hyperspectral inputs.
        """
        a = a.float()
        w = self.out.weight.float().flatten(1)  # (C, R)
        xb = x.float() - conv_bias(self.out).float().view(1, -1, 1, 1)
        u = torch.einsum("cr,bchw->brhw", w, xb)
        gram = w.t() @ w
        xx = xb.pow(2).sum(1)
        errs = []
        for e in self.embed.float():
            h = F.relu(a + e.view(1, -1, 1, 1))
            hgh = (h * torch.einsum("rs,bshw->brhw", gram, h)).sum(1)
            errs.append(xx - 2 * (u * h).sum(1) + hgh)
        return (torch.stack(errs, 1) / x.shape[1]).clamp_min(0.0)


class LowRankHead(nn.Module):
    """Logits affine in the latent: ``logits = b(h) + A(h) up(P z)``, a per-pixel factor A.

    ``P`` maps the L latent channels to ``rank`` noise channels at the latent's resolution
    (a 1x1 convolution, cheap there); ``up`` is bilinear upsampling; ``b`` and the K x rank
    factor ``A`` come from the decoder's full-resolution features ``h`` by 1x1 convolutions.
    For ``z ~ N(mu, sigma^2)`` the logits of a pixel are Gaussian with mean
    ``b + A up(P mu)`` and a rank-``rank`` covariance, correlated between neighbouring pixels
    through the shared latent cells: the local form of a stochastic segmentation network
    (Monteiro et al. 2020) whose noise is the VAE's own posterior. A sample costs
    ``rank`` multiply-adds per class and pixel, not a pass through the head.
    """

    def __init__(self, width: int, latent_channels: int, num_classes: int, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.num_classes = num_classes
        self.proj = nn.Conv2d(latent_channels, rank, 1)
        self.trunk = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(inplace=True))
        # One convolution gives b (the first K channels) and A, ordered (noise channel, class):
        # A[:, :, r] = out[:, K + r*K : K + (r+1)*K]. One conv with K*(1+rank) outputs is 2.6x
        # faster in oneDNN than one with K = 7 (measured: 4.6 vs 12 ms at 8x16x128x128).
        self.out = nn.Conv2d(width, num_classes * (1 + rank), 1)

    def parts(self, h: Tensor, contiguous: bool = True) -> tuple[Tensor, Tensor]:
        """``(b, A)``: (B, K, H, W) offset and (B, rank*K, H, W) factor, in the plain
        (channels-first) layout in which the per-sample multiply-adds are contiguous.

        ``contiguous=False`` leaves them in the convolution's layout (channels-last on the
        CPU), for one logits map: its multiply-adds are as fast there, and copying the
        (1 + rank) * K channels out first took 3x the time of the whole step (560² tile).
        """
        o = self.out(self.trunk(h))
        if contiguous:
            o = o.contiguous()
        return o[:, : self.num_classes], o[:, self.num_classes :]

    def noise(self, z: Tensor) -> Tensor:
        """The rank noise channels of latent maps z, channels-first (bilinear upsampling of a
        2-channel map is 5x faster in that layout than channels-last)."""
        return self.proj(z).contiguous()

    def logits(self, b: Tensor, factor: Tensor, noise: Tensor) -> Tensor:
        """``b + A noise`` for one upsampled noise map (B, rank, H, W)."""
        k = self.num_classes
        out = b
        for i in range(self.rank):
            out = torch.addcmul(out, factor[:, i * k : (i + 1) * k], noise[:, i : i + 1])
        return out

    def sample_logits(self, b: Tensor, factor: Tensor, noise: Tensor) -> Tensor:
        """:meth:`logits` for S upsampled noise maps (S, B, rank, H, W) at once: (S, B, K, H, W).

        The same multiply-adds in the same order (the same values), broadcast over the
        samples into one tensor: a logits tensor per sample stacked afterwards was 12 % of a
        CPU prediction with 8 samples (560² tile), the copy alone. Prediction only: the
        gradients it gives the parts are summed over the samples in another order than the
        stack's (see ``VAESegmenter._head_samples``).
        """
        k = self.num_classes
        if self.rank == 0:
            return b.unsqueeze(0).expand(len(noise), *b.shape).clone()
        out = torch.addcmul(b.unsqueeze(0), factor[:, :k].unsqueeze(0), noise[:, :, 0:1])
        for i in range(1, self.rank):
            out.addcmul_(factor[:, i * k : (i + 1) * k].unsqueeze(0), noise[:, :, i : i + 1])
        return out
