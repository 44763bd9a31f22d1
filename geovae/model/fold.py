"""Folding eval-mode BatchNorm into the convolution before it, for prediction only.

In eval mode a BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals one
convolution with rescaled weights and a bias. Folding removes a full pass over every
feature map; on the benchmark CPU it makes the default VAE's forward passes about 1.14x
faster (1.04-1.08x a whole ``segment`` run) with the same argmax (logits differ by rounding,
a few 1e-6). It is applied by
:func:`geovae.model.io.load_model`, which owns the module it builds; a module handed to
:class:`~geovae.model.base.SegmentationModel` directly (a training task's, say) is left as it
is, since folding changes its parameters and it may still be trained.
"""

from __future__ import annotations

import itertools

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every ``Conv2d`` directly followed by a ``BatchNorm2d`` in an ``nn.Sequential``.

    Only that pattern is folded: it is the one place where the BatchNorm provably takes the
    convolution's output and nothing else (geovae's VAE blocks, segmentation_models_pytorch's
    ``Conv2dReLU``). Modules that call a BatchNorm from ``forward`` (a ResNet's ``bn1``) are
    left alone. The BatchNorm is replaced by ``nn.Identity`` so state-dict keys of the rest
    keep their positions. The module is put in eval mode and changed in place.

    Returns:
        The number of BatchNorm layers folded.
    """
    module.eval()
    folded = 0
    for seq in list(module.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = seq._modules[a], seq._modules[b]
            if (
                type(conv) is nn.Conv2d
                and type(bn) is nn.BatchNorm2d
                and bn.track_running_stats
                and bn.running_mean is not None
                and bn.num_features == conv.out_channels
                and conv.padding_mode == "zeros"
            ):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
                folded += 1
    return folded
