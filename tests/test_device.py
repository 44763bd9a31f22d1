"""Device and precision choice, and the CPU bf16 path against fp32 on a real scene."""

from __future__ import annotations

from pathlib import Path

import pytest
import rasterio
import torch

from geovae.device import autocast_dtype, resolve_device
from geovae.errors import OptionError
from geovae.model import ModelInfo, SegmentationModel
from geovae.model.vae import VAESegmenter


def test_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(OptionError, match="fp16 needs a CUDA"):
        autocast_dtype(cpu, "fp16")
    with pytest.raises(OptionError, match="choose from"):
        autocast_dtype(cpu, "int8")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="no CUDA"):
            resolve_device("cuda:0")
    with pytest.raises(OptionError):
        resolve_device("tpu")


def test_bf16_on_cpu_agrees_with_fp32_on_real_pixels(nc_stack: Path) -> None:
    torch.manual_seed(0)
    module = VAESegmenter(6, 7, base_channels=16, depth=3)
    with rasterio.open(nc_stack) as src:
        x = torch.from_numpy(src.read(window=((8, 136), (64, 192))).astype("float32"))[None]
    info = ModelInfo(in_channels=6, num_classes=7, mean=x.mean((0, 2, 3)).tolist(), std=x.std((0, 2, 3)).tolist())
    # BatchNorm running statistics from the scene, so the random net has non-trivial outputs
    module.train()
    with torch.no_grad():
        module((x - torch.tensor(info.mean).view(1, -1, 1, 1)) / torch.tensor(info.std).view(1, -1, 1, 1))
    fp32 = SegmentationModel(module, info, device="cpu")
    bf16 = fp32.with_precision("bf16")
    assert bf16.module is fp32.module and fp32.amp_dtype is None
    a = fp32.predict(x)["probs"].argmax(1)
    b = bf16.predict(x)["probs"].argmax(1)
    assert (a == b).float().mean() > 0.98
