"""Set up each worker process of ``geovae batch``'s local cluster (a Dask preload).

Dask imports this module in every worker process it starts for :func:`geovae.batch.connect`
and calls :func:`dask_setup` there, in the worker's main thread, before any scene runs.
"""

from __future__ import annotations

from typing import Any

from geovae import signals


def dask_setup(worker: Any) -> None:
    """Ctrl-C is the batch's to handle, and a SIGTERM or the worker's exit waits for the
    output sets being committed (:func:`geovae.signals.worker_process`)."""
    signals.worker_process()
