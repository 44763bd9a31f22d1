"""The VAE segmenter: one encoder, a spatial Gaussian latent, two decoders.

The design combines the Probabilistic U-Net (a Gaussian latent whose samples give spatially
coherent alternative segmentations, injected next to the output so that extra samples only
re-run a few 1x1 convolutions) with autoencoder-regularised segmentation (a second decoder
rebuilds the input bands, which regularises the shared encoder, lets unlabelled pixels train
it, and gives a per-pixel anomaly score at predict time).

::

    x ─ encoder ─┬─ skips ───────────────► segmentation decoder ─ h ─┐
                 └─ bottleneck ─ mu, logvar ─ z ─┬─ upsample ───────► head(h, z) ─► logits
                                                 └─ reconstruction decoder ─────► x̂

Everything is convolutional and the latent is a *map* at the bottleneck resolution (one
Gaussian per ``stride`` x ``stride`` cell), not a vector pooled over the tile, so a pixel's
prediction depends only on its neighbourhood: tiled inference with a halo equals an untiled
pass, with no seams. Normalisation is BatchNorm, which in eval mode is a fixed per-channel
affine map and so, unlike GroupNorm or InstanceNorm, does not depend on the tile's contents.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geovae.choices import HEADS, RECON_CONDITIONS, Head, ReconCondition
from geovae.errors import ModelMismatchError, OptionError
from geovae.model.layers import (
    ClassConditionalDecoder,
    LowRankHead,
    SmpEncoder,
    UNetEncoder,
    UpBlock,
    conv_bias,
    conv_bn_relu,
    stage_widths,
)
from geovae.objects import OBJECT_MAPS


class VAEOutput(NamedTuple):
    """Everything one training step needs from the model.

    Attributes:
        logits: (B, K, H, W) class logits for the latent used (a sample or the mean).
        reconstruction: (B, C, H, W) the input bands rebuilt from the latent (and, with
            ``recon_condition="class"``, each pixel's most likely class).
        mu: (B, L, H / stride, W / stride) latent mean.
        logvar: (B, L, H / stride, W / stride) latent log-variance.
        class_errors: with ``recon_condition="class"``, (B, K, H, W) the squared
            reconstruction error of each pixel (mean over bands, normalised units) if the
            pixel were of class k, against the model's own input; None otherwise.
        sample_logits: with ``samples > 1`` in :meth:`VAESegmenter.forward_all`,
            (S, B, K, H, W) logits of S latent samples (``logits`` is the first); None otherwise.
        q_mu: with a label-aware posterior (:class:`PosteriorNet`), the mean of q(z | x, y)
            that ``z`` was drawn from (``mu``/``logvar`` are then the prior p(z | x)).
        q_logvar: its log-variance.
        object_maps: with object heads, (B, 2, H, W) logits of the object extent and of the
            distance to the object's outline (normalised per object to 0..1); None otherwise.
    """

    logits: Tensor
    reconstruction: Tensor
    mu: Tensor
    logvar: Tensor
    class_errors: Tensor | None = None
    sample_logits: Tensor | None = None
    q_mu: Tensor | None = None
    q_logvar: Tensor | None = None
    object_maps: Tensor | None = None


def class_argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(1)`` for (B, K, H, W), fast in either memory layout.

    PyTorch's CPU argmax over the channel dim of a channels-first tensor is 8x slower than a
    running maximum over the K planes (35 vs 4.9 ms at 8x7x128x128); ties go to the lowest
    class, as in ``argmax``.
    """
    if logits.is_contiguous(memory_format=torch.channels_last) or logits.device.type != "cpu":
        return logits.argmax(1)
    best = logits[:, 0]
    idx = torch.zeros(best.shape, dtype=torch.long, device=logits.device)
    for k in range(1, logits.shape[1]):
        lk = logits[:, k]
        idx.masked_fill_(lk > best, k)
        best = torch.maximum(best, lk)
    return idx


class PosteriorNet(nn.Module):
    """q(z | x, y): the latent map given the bands *and the labels* (training only).

    The Probabilistic U-Net's posterior (Kohl et al. 2018): a small strided encoder over the
    bands, the one-hot labels and a labelled-pixel channel, down to the latent grid. Trained
    with KL(q || p) against the segmenter's own p(z | x), it teaches that prior to spread its
    samples where the labels are not predictable from the image. Not part of a model file.

    Args:
        in_channels: bands.
        num_classes: classes.
        latent_channels: channels of the latent map.
        depth: stride-2 stages (the segmenter's; output at 1/2**depth).
        width: channels of every stage.
    """

    def __init__(self, in_channels: int, num_classes: int, latent_channels: int, depth: int, width: int = 16) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = [conv_bn_relu(in_channels + num_classes + 1, width)]
        for _ in range(depth):
            layers.append(conv_bn_relu(width, width, stride=2))
        self.net = nn.Sequential(*layers)
        self.to_mu = nn.Conv2d(width, latent_channels, 1)
        self.to_logvar = nn.Conv2d(width, latent_channels, 1)
        nn.init.zeros_(self.to_logvar.weight)
        nn.init.constant_(conv_bias(self.to_logvar), -2.0)

    def forward(self, x: Tensor, labels: Tensor, labelled: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` of q(z | x, y) from (B, C, H, W) bands, (B, H, W) class indices and
        (B, H, W) bool labelled pixels (their labels are ignored elsewhere)."""
        lab = labelled.to(x.dtype)
        onehot = F.one_hot(torch.where(labelled, labels, torch.zeros_like(labels)), self.num_classes)
        onehot = onehot.permute(0, 3, 1, 2).to(x.dtype) * lab[:, None]
        f = self.net(torch.cat([x, onehot, lab[:, None]], 1))
        return self.to_mu(f), self.to_logvar(f).clamp(-10.0, 10.0)


class VAESegmenter(nn.Module):
    """A variational segmenter with a spatial Gaussian latent and a reconstruction decoder.

    The segmentation decoder is a U-Net decoder over the encoder's skips; the latent sample
    ``z`` (a map at 1/``stride`` resolution) is upsampled bilinearly to full resolution,
    concatenated with the decoder's last features and mapped to logits by three 1x1
    convolutions, so ``n`` extra samples cost ``n`` runs of that small head only. Because ``z``
    is smooth at the scale of a latent cell, samples differ in spatially coherent regions.

    The reconstruction decoder takes ``z`` and no skip connections: the input must pass
    through the ``latent_channels``-channel map at 1/``stride`` resolution, a real bottleneck,
    so pixels unlike the training data (clouds, haze, sensor faults) are rebuilt badly and the
    reconstruction error is a usable anomaly map. The same property lets :meth:`generate`
    decode images from latent samples drawn from the N(0, I) prior.

    With ``recon_condition="class"`` (the default) the reconstruction decoder also gets each
    pixel's class, as in the semi-supervised VAE (p(x | y, z)): labelled pixels use their
    label; for unlabelled pixels the training loss takes the expectation of the error over
    the segmentation's class probabilities, so unlabelled pixels train the *classifier*
    (towards classes that explain their bands), not only the encoder. ``"none"`` rebuilds
    from ``z`` alone (model files written before this option).

    Args:
        in_channels: number of input bands (1 to several hundred).
        num_classes: number of classes (output channels of the logits).
        base_channels: width of the full-resolution features; deeper levels use 2x that.
        depth: number of stride-2 stages; tile height and width must be multiples of
            ``stride = 2**depth``.
        latent_channels: channels of the Gaussian latent map.
        encoder: ``"unet"`` (built-in, BatchNorm) or ``"smp:<name>"`` for a
            segmentation_models_pytorch / timm encoder such as ``"smp:resnet18"``.
        encoder_weights: must be None: the model never fetches weights itself; a model file
            holds them, and training starts from pretrained ones through the task's
            ``encoder_weights`` (:class:`~geovae.training.VAESegmentationTask`).
        recon_condition: ``"class"`` (reconstruction given z and the pixel's class) or
            ``"none"`` (given z alone).
        object_heads: add the object heads of field delineation (ResUNet-a): beside the
            class logits, a 3x3 and a 1x1 convolution on the decoder's last features give
            the logits of each pixel's object extent and of its distance to the object's
            outline (0 at the outline, 1 at the object's most interior pixel). They do not
            see the latent: they are the same for every sample.

    Raises:
        OptionError: if an argument is out of range or the encoder is unknown.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        base_channels: int = 32,
        depth: int = 4,
        latent_channels: int = 8,
        encoder: str = "unet",
        encoder_weights: None = None,
        recon_condition: ReconCondition = "class",
        head: Head = "mlp",
        head_rank: int = 2,
        object_heads: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise OptionError(f"in_channels={in_channels}: a model needs at least one input band")
        if num_classes < 1:
            raise OptionError(f"num_classes={num_classes}: a model needs at least one class")
        if not 1 <= depth <= 6:
            raise OptionError(f"depth={depth}: use 1 to 6 stride-2 stages")
        if base_channels < 1 or latent_channels < 1:
            raise OptionError("base_channels and latent_channels must be at least 1")
        if encoder_weights is not None:
            raise OptionError("encoder_weights: geovae never downloads weights; use None and load a model file")
        if recon_condition not in RECON_CONDITIONS:
            raise OptionError(f"recon_condition={recon_condition!r}: use {' or '.join(map(repr, RECON_CONDITIONS))}")
        if head not in HEADS:
            raise OptionError(f"head={head!r}: use {' or '.join(map(repr, HEADS))}")
        if head_rank < 1:
            raise OptionError(f"head_rank={head_rank}: use at least 1")
        self._hparams: dict[str, Any] = {
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "base_channels": int(base_channels),
            "depth": int(depth),
            "latent_channels": int(latent_channels),
            "encoder": str(encoder),
            "recon_condition": str(recon_condition),
            "head": str(head),
        }
        if head == "lowrank":
            self._hparams["head_rank"] = int(head_rank)
        if object_heads:
            self._hparams["object_heads"] = True
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.latent_channels = latent_channels
        self.stride = 2**depth

        if encoder == "unet":
            self.encoder: UNetEncoder | SmpEncoder = UNetEncoder(in_channels, base_channels, depth)
        elif encoder.startswith("smp:"):
            self.encoder = SmpEncoder(encoder[4:], in_channels, depth, encoder_weights)
        else:
            raise OptionError(f"encoder={encoder!r}: use 'unet' or 'smp:<name>' (e.g. smp:resnet18)")
        enc_ch = list(self.encoder.out_channels)
        if len(enc_ch) != depth + 1:
            raise OptionError(f"encoder {encoder} gives {len(enc_ch) - 1} stages, expected depth={depth}")

        dec_w = stage_widths(base_channels, depth)
        # Segmentation decoder: from the bottleneck up through every skip to full resolution.
        self.decoder_blocks = nn.ModuleList()
        c_deep = enc_ch[depth]
        for i in range(depth - 1, -1, -1):
            self.decoder_blocks.append(UpBlock(c_deep, enc_ch[i], dec_w[i]))
            c_deep = dec_w[i]

        self.to_mu = nn.Conv2d(enc_ch[depth], latent_channels, 1)
        self.to_logvar = nn.Conv2d(enc_ch[depth], latent_channels, 1)
        # Start with a small posterior variance so that early training sees informative z.
        nn.init.zeros_(self.to_logvar.weight)
        nn.init.constant_(conv_bias(self.to_logvar), -2.0)

        h = dec_w[0]
        self.head_kind = head
        if head == "lowrank":
            self.head: LowRankHead | nn.Sequential = LowRankHead(h, latent_channels, num_classes, head_rank)
        else:
            self.head = nn.Sequential(
                nn.Conv2d(h + latent_channels, h, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(h, h, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(h, num_classes, 1),
            )

        self.object_head: nn.Sequential | None = (
            nn.Sequential(conv_bn_relu(h, h), nn.Conv2d(h, len(OBJECT_MAPS), 1)) if object_heads else None
        )

        # Reconstruction decoder: z alone, one conv per level, half the segmentation widths.
        rw = [max(w // 2, 8) for w in dec_w]
        layers: list[nn.Module] = [conv_bn_relu(latent_channels, rw[depth])]
        for i in range(depth - 1, -1, -1):
            layers += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                conv_bn_relu(rw[i + 1], rw[i]),
            ]
        self.recon_condition = recon_condition
        if recon_condition == "class":
            self.recon_decoder: ClassConditionalDecoder | nn.Sequential = ClassConditionalDecoder(
                nn.Sequential(*layers), rw[0], num_classes, in_channels
            )
        else:
            layers.append(nn.Conv2d(rw[0], in_channels, 1))
            self.recon_decoder = nn.Sequential(*layers)

    @property
    def has_object_heads(self) -> bool:
        """Whether the model predicts object extent and distance (:data:`OBJECT_MAPS`)."""
        return self.object_head is not None

    @property
    def hparams(self) -> dict[str, Any]:
        """The constructor arguments: ``VAESegmenter(**model.hparams)`` rebuilds the model."""
        return dict(self._hparams)

    # -- internals ---------------------------------------------------------------------

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ModelMismatchError(f"expected a (batch, bands, height, width) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ModelMismatchError(
                f"input has {x.shape[1]} bands but the model expects {self.in_channels}; "
                "use a scene with the model's bands"
            )
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ModelMismatchError(
                f"tile size {h}x{w} is not a multiple of the model stride {self.stride}; "
                f"use a tile size that is a multiple of {self.stride}"
            )

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features for the head, latent mean and log-variance."""
        self._check(x)
        feats = self.encoder(x)
        h = feats[-1]
        for block, skip in zip(self.decoder_blocks, reversed(feats[:-1])):
            h = block(h, skip)
        bottleneck = feats[-1]
        # Clamping keeps exp(logvar) finite under fp16 autocast and early in training.
        return h, self.to_mu(bottleneck), self.to_logvar(bottleneck).clamp(-10.0, 10.0)

    def _up(self, z: Tensor, like: Tensor) -> Tensor:
        return F.interpolate(z, size=like.shape[-2:], mode="bilinear", align_corners=False).to(like.dtype)

    def _head(self, h: Tensor, z: Tensor, parts: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Logits for one latent map ``z`` (the low-rank head's ``parts`` may be given)."""
        head = self.head
        if isinstance(head, LowRankHead):
            b, factor = parts if parts is not None else head.parts(h)
            return head.logits(b, factor, self._up(head.noise(z), h))
        return head(torch.cat([h, self._up(z, h)], dim=1))

    def _head_samples(
        self, h: Tensor, mu: Tensor, logvar: Tensor, n: int, parts: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(z, logits)``: ``n`` posterior samples (n, B, L, h, w) and their logits
        (n, B, K, H, W). The low-rank head's features (``parts``) are computed once and its
        noise maps are upsampled in one call."""
        zs = mu.unsqueeze(0) + torch.randn((n, *mu.shape), device=mu.device, dtype=mu.dtype) * torch.exp(
            0.5 * logvar
        ).unsqueeze(0)
        head = self.head
        if not isinstance(head, LowRankHead):
            return zs, torch.stack([self._head(h, z) for z in zs])
        b, factor = parts if parts is not None else head.parts(h)
        noise = self._up(head.noise(zs.flatten(0, 1)), h).unflatten(0, (n, mu.shape[0]))
        if torch.is_grad_enabled():
            # Training: one logits tensor per sample, so the gradients reaching the head's
            # parts add up sample by sample in the order they always did (the broadcast form
            # sums them in another order: other rounding, another training run).
            return zs, torch.stack([head.logits(b, factor, noise[i]) for i in range(n)])
        return zs, head.sample_logits(b, factor, noise)

    @staticmethod
    def _reparameterise(mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    # -- public API --------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Class logits at the latent mean: a drop-in TorchGeo / smp segmentation model.

        Args:
            x: (B, C, H, W) normalised bands; H and W multiples of :attr:`stride`.

        Returns:
            (B, K, H, W) logits.

        Raises:
            ModelMismatchError: wrong band count or a tile size not a multiple of the stride.
        """
        h, mu, _ = self._encode(x)
        return self._head(h, mu)

    def forward_all(
        self, x: Tensor, sample: bool = True, samples: int = 1, posterior: tuple[Tensor, Tensor] | None = None
    ) -> VAEOutput:
        """Logits, reconstruction and the latent distribution, for training.

        Args:
            x: (B, C, H, W) normalised bands.
            sample: draw ``z`` from the posterior (training); False uses its mean.
            samples: with ``sample``, the number of latent samples whose logits are returned
                in ``sample_logits`` (the mixture loss); the reconstruction uses the first.
            posterior: ``(mu, logvar)`` of a label-aware posterior q(z | x, y) on the latent
                grid (:class:`PosteriorNet`) to draw ``z`` from instead of the encoder's
                p(z | x) (the Probabilistic U-Net's training pass).

        Returns:
            A :class:`VAEOutput`; ``logits`` and the reconstruction come from the same ``z``.
        """
        h, mu, logvar = self._encode(x)
        zmu, zlv = posterior if posterior is not None else (mu, logvar)
        many = None
        if sample and samples > 1:
            zs, many = self._head_samples(h, zmu, zlv, samples)
            z, logits = zs[0], many[0]
        else:
            z = self._reparameterise(zmu, zlv) if sample else zmu
            logits = self._head(h, z)
        qm, ql = posterior if posterior is not None else (None, None)
        maps = self.object_head(h) if self.object_head is not None else None
        dec = self.recon_decoder
        if isinstance(dec, ClassConditionalDecoder):
            a = dec.features(z)
            rec = dec.decode(a, class_argmax(logits.detach()))
            return VAEOutput(logits, rec, mu, logvar, dec.class_errors(a, x), many, qm, ql, maps)
        return VAEOutput(logits, dec(z), mu, logvar, None, many, qm, ql, maps)

    def infer(
        self, x: Tensor, samples: int = 0, reconstruction: bool = False, objects: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Everything prediction needs from one encoder pass.

        Args:
            x: (B, C, H, W) normalised bands.
            samples: latent samples (0: the latent mean only).
            reconstruction: also rebuild the input.
            objects: also give the object maps (a model with object heads).

        Returns:
            ``(logits, reconstruction, object_maps)``: logits (B, K, H, W) at the latent
            mean, or (samples, B, K, H, W); the reconstruction as :meth:`reconstruct` gives
            it, or None; the object maps' logits (B, 2, H, W) (:data:`OBJECT_MAPS`), or None.
        """
        h, mu, logvar = self._encode(x)
        parts = self.head.parts(h, contiguous=samples > 0) if isinstance(self.head, LowRankHead) else None
        # Plain layout for the softmax that follows: its sums over the classes then run in
        # the same order whatever layout the head's parts had, so the values do not change.
        mean_logits = self._head(h, mu, parts).contiguous()
        logits = self._head_samples(h, mu, logvar, samples, parts)[1] if samples > 0 else mean_logits
        rec = None
        if reconstruction:
            dec = self.recon_decoder
            if isinstance(dec, ClassConditionalDecoder):
                rec = dec.decode(dec.features(mu), class_argmax(mean_logits))
            else:
                rec = dec(mu)
        maps = self.object_head(h) if objects and self.object_head is not None else None
        return logits, rec, maps

    def sample_logits(self, x: Tensor, n: int) -> Tensor:
        """Logits for ``n`` latent samples; the encoder and decoder run once.

        Args:
            x: (B, C, H, W) normalised bands.
            n: number of samples (at least 1).

        Returns:
            (n, B, K, H, W) logits.
        """
        if n < 1:
            raise OptionError(f"samples={n}: ask for at least one latent sample")
        h, mu, logvar = self._encode(x)
        return self._head_samples(h, mu, logvar, n)[1]

    def sample(self, x: Tensor, n: int) -> Tensor:
        """``n`` class-probability maps, one per latent sample.

        Args:
            x: (B, C, H, W) normalised bands.
            n: number of samples.

        Returns:
            (n, B, K, H, W) probabilities (softmax over K).
        """
        return self.sample_logits(x, n).softmax(dim=2)

    def reconstruct(self, x: Tensor) -> Tensor:
        """The input rebuilt from the latent mean (and the predicted classes), normalised units.

        Args:
            x: (B, C, H, W) normalised bands.

        Returns:
            (B, C, H, W) reconstruction.
        """
        dec = self.recon_decoder
        if isinstance(dec, ClassConditionalDecoder):
            h, mu, _ = self._encode(x)
            return dec.decode(dec.features(mu), class_argmax(self._head(h, mu)))
        self._check(x)
        feats = self.encoder(x)
        return dec(self.to_mu(feats[-1]))

    def generate(self, n: int, size: int | tuple[int, int], classes: Tensor | int | None = None) -> Tensor:
        """Images decoded from ``n`` latent maps drawn from the N(0, I) prior.

        Args:
            n: number of images.
            size: output height and width (an int for a square), multiples of :attr:`stride`.
            classes: with ``recon_condition="class"``, the class index of every pixel (an int,
                or (n, H, W) indices); None averages the decoded images over the classes.

        Returns:
            (n, C, H, W) images in the model's normalised units.

        Raises:
            ModelMismatchError: if ``size`` is not a multiple of the stride.
        """
        hh, ww = (size, size) if isinstance(size, int) else size
        if hh % self.stride or ww % self.stride or hh < 1 or ww < 1:
            raise ModelMismatchError(
                f"size {hh}x{ww} is not a positive multiple of the model stride {self.stride}; "
                f"use a multiple of {self.stride}"
            )
        p = next(self.parameters())
        z = torch.randn(n, self.latent_channels, hh // self.stride, ww // self.stride, device=p.device, dtype=p.dtype)
        dec = self.recon_decoder
        if not isinstance(dec, ClassConditionalDecoder):
            return dec(z)
        a = dec.features(z)
        if classes is None:
            return dec.decode_mean(a)
        if isinstance(classes, int):
            if not 0 <= classes < self.num_classes:
                raise OptionError(f"classes={classes}: use a class index 0..{self.num_classes - 1}")
            classes = torch.full((n, hh, ww), classes, dtype=torch.long, device=p.device)
        return dec.decode(a, classes.to(p.device).long())
