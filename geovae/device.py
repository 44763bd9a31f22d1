"""Choice of the torch device and of the precision to run on it."""

from __future__ import annotations

import torch

from geovae.errors import OptionError


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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for inference on ``device``, or None for full precision.

    bf16 where the GPU supports it (no overflow risk in softmax), else fp16; the CPU runs
    fp32 because CPU autocast is slower than fp32 for small convolutional nets.
    """
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
