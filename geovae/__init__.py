"""geovae: large satellite scenes to land-cover maps and polygons.

The public functions are imported lazily so that ``geovae --help`` and ``geovae info`` do
not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

from geovae._version import __version__

__all__ = ["__version__", "describe_scene", "segment_scene", "vectorize", "run_batch", "evaluate", "load_model"]

_LAZY = {
    "describe_scene": "geovae.scene",
    "segment_scene": "geovae.predict",
    "vectorize": "geovae.vectorize",
    "run_batch": "geovae.batch",
    "evaluate": "geovae.metrics",
    "load_model": "geovae.model.io",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geovae' has no attribute {name!r}")
