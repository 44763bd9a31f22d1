"""How far a tile's edge reaches into its predictions: the model's halo, measured once.

A convolutional model sees a tile's edge as zero padding; a pixel near the edge is predicted
from less context than in one untiled pass over the scene. The halo is the distance from a
tile's edge beyond which the predicted class probabilities no longer differ from an untiled
pass by more than a tolerance. Blending only each tile's pixels farther than the halo from
its edge (:mod:`geovae.tiling`) makes tiling invisible by construction, for any model.

It is measured directly: random inputs in the model's normalised units (the statistics of
its training data, by construction of the normalisation) are predicted whole and cut in
half along each axis; the farthest distance from the cut at which the halves' probabilities
differ from the whole by more than the tolerance is the halo. The model file records it
(``ModelInfo.halo``); older files and TorchGeo checkpoints are measured when loaded.

Two kinds of random input, the larger halo kept: white noise, and smooth noise (white noise
at 1/8 resolution, bicubic upsampled, unit variance), which looks to a model more like a real
scene, whose neighbouring pixels are alike. White noise alone could saturate a model's
softmax so that the cut hardly moves a probability: a parcel model trained on Sentinel-2 NDVI
measures 8 px on white noise, 33 on smooth noise and 29 on a real NDVI window, and two
tilings of a real scene with the 8-px halo's overlap differ by up to 0.17 in probability.

A model with object heads (:attr:`~geovae.model.vae.VAESegmenter.has_object_heads`) is
measured over its class probabilities and its object maps (extent and distance, 0..1) together:
the halo covers every output a run blends.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HALO_METHOD", "HALO_TOLERANCE", "measure_halo"]

#: Largest change of a class probability a tile's edge may cause at a blended pixel.
HALO_TOLERANCE = 1e-3
#: Which measurement a model file's halo came from (``ModelInfo.extra["halo_method"]``): 2 is
#: white and smooth noise (this module); files without it were measured on white noise only,
#: which can fall short, so :func:`geovae.model.io.load_model` measures their halo again.
HALO_METHOD = 2


@torch.inference_mode()
def measure_halo(
    module: nn.Module,
    in_channels: int,
    stride: int = 1,
    *,
    size: int = 256,
    tol: float = HALO_TOLERANCE,
    seeds: tuple[int, ...] = (0,),
) -> int:
    """The model's halo in pixels (a multiple of ``stride``, at most ``size // 2``).

    Args:
        module: maps a normalised (B, C, H, W) batch to (B, K, H, W) logits; eval mode. With
            object heads, its object maps count as well.
        in_channels: its band count.
        stride: its stride (inputs must be multiples of it).
        size: side of the random test input; a halo that reaches ``size // 2`` is reported as
            that (the model looks farther than can be measured cheaply). Ten forward passes
            of this size per seed: about a second for the default VAE on a CPU.
        tol: the largest change of a class probability allowed beyond the halo.
        seeds: seeds of the random inputs (a white and a smooth noise input each) to take
            the largest halo over.

    Returns:
        The halo.
    """
    size = max(stride * 2, size // (2 * stride) * 2 * stride)
    half = size // 2
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    gen = torch.Generator().manual_seed(0)
    radius = 0
    try:
        heads = bool(getattr(module, "has_object_heads", False))

        def probs(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous(memory_format=torch.channels_last)
            if heads:
                logits, _, maps = module.infer(t, objects=True)  # type: ignore[operator]  # torch types Module attributes Tensor | Module
                return torch.cat([logits.float().softmax(1), maps.float().sigmoid()], 1)
            return module(t).float().softmax(1)

        for x in (t.to(device) for seed in seeds for t in _inputs(in_channels, size, gen.manual_seed(seed))):
            whole = probs(x)
            # Each half of the input alone; its cut edge is where tiling's padding would be.
            for axis in (-1, -2):
                for first in (True, False):
                    sl = [slice(None)] * 4
                    sl[axis] = slice(0, half) if first else slice(half, size)
                    d = (probs(x[tuple(sl)]) - whole[tuple(sl)]).abs()
                    d = d.amax(dim=(0, 1, 2 if axis == -1 else 3))
                    hit = torch.nonzero(d > tol).flatten()
                    if len(hit):
                        # distance from the cut: the half's far end (first) or its start
                        r = half - int(hit.min()) if first else int(hit.max()) + 1
                        radius = max(radius, r)
    finally:
        module.train(was_training)
    return min(half, int(math.ceil(radius / stride) * stride))


def _inputs(in_channels: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """White noise and smooth noise (see the module's docstring), (1, C, size, size), unit variance."""
    white = torch.randn(1, in_channels, size, size, generator=gen)
    coarse = torch.randn(1, in_channels, max(2, size // 8), max(2, size // 8), generator=gen)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return white, smooth / smooth.std()
