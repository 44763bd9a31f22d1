"""Choice of the torch device and of the precision to run on it."""

from __future__ import annotations

import torch

from geovae.choices import PRECISIONS, Precision
from geovae.errors import OptionError

__all__ = ["PRECISIONS", "Precision", "autocast_dtype", "resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's device string into a usable :class:`torch.device`.

    Args:
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        The device.

    Raises:
        OptionError: if the device is unknown or CUDA is asked for where there is none.
    """
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here; "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return dev
    raise OptionError(f"--device {device}: unknown device; use auto, cpu, cuda or cuda:N")


def autocast_dtype(device: torch.device, precision: Precision = "auto") -> torch.dtype | None:
    """The mixed-precision dtype for inference on ``device``, or None for full precision.

    Args:
        device: where the model runs.
        precision: ``auto`` (bf16 on a GPU that supports it, else fp16; fp32 on the CPU, where
            results then match training exactly), ``fp32``, ``bf16`` (also on CPUs with
            AVX-512 BF16/AMX, where it is several times faster for convolutions) or ``fp16``
            (CUDA only).

    Raises:
        OptionError: an unknown precision, or fp16 on the CPU.
    """
    p = (precision or "auto").lower()
    if p not in PRECISIONS:
        raise OptionError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")
    if p == "fp32":
        return None
    if p == "bf16":
        return torch.bfloat16
    if p == "fp16":
        if device.type != "cuda":
            raise OptionError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
