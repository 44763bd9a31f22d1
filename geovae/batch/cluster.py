"""The cluster: connecting to one (or starting a local one) and a model cache on every worker."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin

from geovae import signals
from geovae.batch.manifest import model_fingerprint
from geovae.choices import Backend
from geovae.errors import ClusterError, OptionError, one_line

if TYPE_CHECKING:
    from distributed import Client, Worker

    from geovae.model.base import SegmentationModel

log = logging.getLogger("geovae.batch")

PLUGIN_NAME = "geovae-model-cache"


# ------------------------------------------------------------------ per-worker model cache
def _default_loader(path: str, device: str, backend: Backend = "auto") -> SegmentationModel:
    from geovae.model.io import load_model

    return load_model(path, device=device, backend=backend)


class ModelCache(WorkerPlugin):
    """Models loaded on one worker, keyed by file path, size, mtime, device and backend.

    Installed on every worker as a Dask worker plugin (see :func:`install_model_cache`), so
    each worker reads a model file once and every task there reuses it. A new version of the
    file (other size or mtime) replaces the old one, so a long-lived worker never serves
    stale weights.

    Attributes:
        loads: how many times a model file was read on this worker.
    """

    name = PLUGIN_NAME

    def __init__(self, loader: Callable[[str, str], SegmentationModel] | None = None) -> None:
        self._start(loader)

    def _start(self, loader: Callable[[str, str], SegmentationModel] | None) -> None:
        self.loader = loader
        self.loads = 0
        self._models: dict[tuple[str, int, int, str, str], SegmentationModel] = {}
        self._lock = threading.Lock()

    # Locks do not pickle; the plugin travels to the workers, so it is rebuilt on arrival.
    def __getstate__(self) -> dict[str, Any]:
        return {"loader": self.loader, "loads": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._start(state["loader"])

    def setup(self, worker: Worker) -> None:
        """Called by Dask when the plugin is installed on a worker."""

    def teardown(self, worker: Worker) -> None:
        """Called by Dask when the worker closes: release the models (and their GPU memory)."""
        with self._lock:
            self._models.clear()

    def get(self, path: str | Path, device: str = "auto", backend: Backend = "auto") -> SegmentationModel:
        """The model in ``path`` on ``device`` run by ``backend``, loaded on the first call only.

        Threads of one worker share the cache; the lock makes concurrent first calls load once.
        A loader given to the cache takes ``(path, device)`` and decides the backend itself.
        """
        fp = model_fingerprint(path)
        key = (fp["path"], fp["size"], fp["mtime_ns"], str(device), str(backend))
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = (
                    self.loader(fp["path"], str(device))
                    if self.loader
                    else _default_loader(fp["path"], str(device), backend)
                )
                # Drop older versions of this file on this device and backend: their weights are stale.
                self._models = {k: v for k, v in self._models.items() if (k[0], k[3], k[4]) != (key[0], key[3], key[4])}
                self._models[key] = model
                self.loads += 1
        return model


_LOCAL_CACHE = ModelCache()


def worker_model_cache() -> ModelCache:
    """This worker's model cache (installing one if the plugin is missing), or the process's own.

    Outside a Dask worker (a plain function call) a process-wide cache is used, so the same
    code path serves tests and single-process runs.
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return _LOCAL_CACHE
    plugin = worker.plugins.get(PLUGIN_NAME)
    if isinstance(plugin, ModelCache):
        return plugin
    # A worker that joined without the plugin (or lost it); keep a cache on it anyway.
    cache = getattr(worker, "_geovae_model_cache", None)
    if not isinstance(cache, ModelCache):
        cache = ModelCache()
        worker._geovae_model_cache = cache  # type: ignore[attr-defined]  # geovae's own attribute on Dask's Worker
    return cache


def _plugin_loads(dask_worker: Worker) -> int:
    cache = dask_worker.plugins.get(PLUGIN_NAME) or getattr(dask_worker, "_geovae_model_cache", None)
    return cache.loads if isinstance(cache, ModelCache) else 0


def model_loads(client: Client) -> dict[str, int]:
    """How many times each worker of ``client``'s cluster has read a model file."""
    loads: dict[str, int] = client.run(_plugin_loads)
    return loads


def _plugin_installed(dask_scheduler: Any) -> bool:
    return PLUGIN_NAME in getattr(dask_scheduler, "worker_plugins", {})


def install_model_cache(client: Client, loader: Callable[[str, str], SegmentationModel] | None = None) -> None:
    """Install :class:`ModelCache` on every worker of ``client``'s cluster, present and future.

    Kept if already installed, so a long-lived cluster keeps its loaded models between batches.
    """
    try:
        installed = loader is None and client.run_on_scheduler(_plugin_installed)
    except Exception:
        installed = False
    if installed:
        return
    client.register_plugin(ModelCache(loader), name=PLUGIN_NAME)


class QuietWorker(WorkerPlugin):
    """Keeps the workers of a local cluster from printing onto the user's terminal (the
    stderr of a worker the cluster starts again after a crash is the ``geovae`` command's;
    those started with the cluster write to the null device, see :func:`connect`).
    Distributed's own logs below CRITICAL (a task cancelled, a heartbeat failing, when a
    stopped batch closes the cluster) and the native libraries' printing
    (:func:`geovae.native.quiet_native_output`; scene failures reach the manifest as one
    line) are turned off, unless ``verbose``."""

    name = "geovae-quiet"

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose

    def setup(self, worker: Worker) -> None:
        """Called by Dask on every worker of the cluster, present and future."""
        if self.verbose:
            return
        from geovae.native import quiet_native_output

        # CRITICAL, not ERROR: a worker whose scheduler stops (the batch stopped by SIGTERM
        # or Ctrl-C) logs its failed heartbeat as an ERROR with a traceback, racing the
        # parent's one-line exit; what a worker has to say about a scene reaches the
        # manifest as the scene's error instead.
        logging.getLogger("distributed").setLevel(logging.CRITICAL)
        quiet_native_output()


# ---------------------------------------------------------------------- the cluster
@contextlib.contextmanager
def _stderr_to_null(quiet: bool) -> Iterator[None]:
    """With ``quiet``, the processes started in the block (the local cluster's workers) get
    the null device as their standard error instead of the command's terminal.

    A worker has nothing to say there that the manifest does not record, and until its
    preload runs (a second or more after it starts) a Ctrl-C kills it with a traceback
    onto that terminal: a terminal signals every process of the batch. Only the workers
    started here are affected (the block's own writes to file descriptor 2 are lost too:
    this process writes nothing while the cluster starts, its errors are raised).
    """
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def connect(
    scheduler: str | Client | None = None,
    *,
    workers: int | None = None,
    threads_per_worker: int = 1,
    connect_timeout: float = 10,
) -> tuple[Client, Any]:
    """A client to the given scheduler, or to a new ``LocalCluster`` of worker processes.

    Args:
        scheduler: ``tcp://host:port`` (any Dask address), a scheduler JSON file written by
            ``dask scheduler --scheduler-file``, an existing ``distributed.Client`` (used
            as is, for example one made from a dask-jobqueue cluster), or None for a local
            cluster.
        workers: local worker processes; default ``min(2, cores)``.
        threads_per_worker: tasks each local worker runs at once.
        connect_timeout: seconds to wait for the scheduler to answer.

    Returns:
        ``(client, cluster)``; ``cluster`` is the LocalCluster started here (close it after
        the client), or None when connected to an existing scheduler.

    Raises:
        ClusterError: if the scheduler does not answer in time or the cluster cannot start.
        OptionError: for nonsensical worker counts.
    """
    from distributed import Client, LocalCluster

    # Importing distributed turns its loggers to INFO; its cluster chatter (workers starting,
    # closing) is not what a geovae user asked to see unless geovae itself logs at DEBUG.
    if not logging.getLogger("geovae").isEnabledFor(logging.DEBUG):
        dlog = logging.getLogger("distributed")
        dlog.setLevel(max(dlog.getEffectiveLevel(), logging.WARNING))
    if threads_per_worker < 1:
        raise OptionError(f"--threads-per-worker {threads_per_worker}: must be at least 1")
    if isinstance(scheduler, Client):
        return scheduler, None
    if scheduler:
        if workers is not None:
            raise OptionError("--workers only applies to the local cluster; drop it when giving --scheduler")
        kw: dict[str, Any] = {"timeout": connect_timeout, "set_as_default": False}
        where = scheduler
        try:
            if scheduler.endswith(".json") and Path(scheduler).is_file():
                client = Client(scheduler_file=scheduler, **kw)
            else:
                client = Client(scheduler, **kw)
        except Exception as e:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {where} within {connect_timeout:g} s ({one_line(e)}); "
                "check the address and that `dask scheduler` is running, or omit --scheduler for a local cluster"
            ) from e
        return client, None
    n = workers if workers is not None else min(2, os.cpu_count() or 1)
    if n < 1:
        raise OptionError(f"--workers {n}: must be at least 1")
    quiet = not logging.getLogger("geovae").isEnabledFor(logging.DEBUG)
    try:
        with _stderr_to_null(quiet):
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=threads_per_worker,
                processes=True,
                host="127.0.0.1",
                # A random port: the default 8787 is often taken by another cluster on the machine.
                dashboard_address="127.0.0.1:0",
                # Signals in the workers: Ctrl-C left to this process, no commit cut by a stop.
                preload=["geovae.batch.worker_setup"],
            )
    except Exception as e:
        # Ctrl-C while the workers start reaches them too (a terminal signals the whole
        # process group), and kills them before their preload ignores it: that is the stop
        # the user asked for, not a cluster that cannot start.
        signals.check()
        raise ClusterError(
            f"cannot start a local Dask cluster of {n} workers ({one_line(e)}); try fewer --workers"
        ) from e
    try:
        client = Client(cluster, set_as_default=False, timeout=connect_timeout)
        if quiet:
            client.register_plugin(QuietWorker(), name=QuietWorker.name)
    except Exception as e:
        cluster.close()
        raise ClusterError(f"cannot connect to the local Dask cluster ({one_line(e)})") from e
    return client, cluster
