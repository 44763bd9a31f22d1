"""geovae: large satellite scenes to land-cover maps and polygons.

The public functions are imported lazily so that ``geovae --help`` and ``geovae info`` do
not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

from geovae._version import __version__

__all__ = ["__version__", "describe_scene", "evaluate", "load_model", "run_batch", "segment_scene", "vectorize", "view"]

_LAZY = {
    "describe_scene": "geovae.scene",
    "segment_scene": "geovae.segment",
    "vectorize": "geovae.vector",
    "run_batch": "geovae.batch",
    "evaluate": "geovae.metrics",
    "load_model": "geovae.model.io",
    "view": "geovae.view",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        # geovae.view is a callable module (geovae.view(path) and geovae.view.show(result)):
        # importing it binds it here, so hand out the module itself, as later lookups get it
        return module if module.__name__ == f"geovae.{name}" else getattr(module, name)
    raise AttributeError(f"module 'geovae' has no attribute {name!r}")
