"""Weights put into a freshly built module, checked first: names, shapes, data types and finite values."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from geovae.errors import ModelFileError


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_state(path: Path, module: nn.Module, state: dict[str, torch.Tensor], *, exact_dtype: bool) -> None:
    """Every tensor the module has, and no other, with its shape and data type, all finite.

    ``load_state_dict`` checks names and shapes but casts values to the module's type: a
    float32 tensor whose header was edited to int32 (same byte size) would load as
    nonsense numbers. The expected types are the module's own parameters and buffers.

    Args:
        path: the file (for the message).
        module: the freshly built module.
        state: the file's tensors.
        exact_dtype: the same type for every tensor (geovae files, which geovae writes);
            False lets a floating-point tensor be any floating-point type (a half-precision
            checkpoint), integer and boolean ones still exact.

    Raises:
        ModelFileError: one line naming the first tensor that does not fit or holds NaN or
            infinity.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            parts.append(f"tensor {missing[0]}{more} missing")
        if unexpected:
            more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
            parts.append(f"unexpected tensor {unexpected[0]}{more}")
        raise ModelFileError(
            f"{path}: weights do not fit the described architecture ({', '.join(parts)}); re-export it"
        )
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ModelFileError(
                f"{path}: weights do not fit the described architecture (tensor {name} has shape "
                f"{tuple(got.shape)}, the model {tuple(want.shape)}); re-export it"
            )
        same = got.dtype == want.dtype or (not exact_dtype and got.is_floating_point() and want.is_floating_point())
        if not same:
            raise ModelFileError(
                f"{path}: tensor {name} holds {_dtype(got)} numbers where the model has {_dtype(want)}; "
                "the file was edited or damaged; re-export or re-download it"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            # A model saved from a diverged run segments every pixel as one class at
            # confidence NaN, with exit 0; geovae no longer writes one, older runs did.
            raise ModelFileError(
                f"{path}: tensor {name} holds non-finite numbers (NaN or infinity): the model was saved "
                "from a training run whose loss diverged, or the file is damaged; retrain or re-download it"
            )


def load_state(path: Path, module: nn.Module, state: dict[str, torch.Tensor], *, exact_dtype: bool = True) -> None:
    """Load ``state`` into ``module`` after :func:`check_state` (same arguments).

    Raises:
        ModelFileError: one line saying what does not fit.
    """
    check_state(path, module, state, exact_dtype=exact_dtype)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # Names, shapes and types were checked; say what is left without the colon-ended
        # header line ("Error(s) in loading state_dict for X:").
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if not ln.endswith(":")), lines[-1] if lines else "")
        raise ModelFileError(f"{path}: weights do not fit the described architecture ({detail}); re-export it") from exc
