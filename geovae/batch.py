"""Many scenes, or one huge scene, on a dask.distributed cluster.

:func:`run_batch` sends one task per scene to a Dask cluster (a ``LocalCluster`` it starts,
or any running scheduler), writes every scene's outputs under ``OUT/<scene-stem>/`` exactly as
:func:`geovae.predict.segment_scene` does, and keeps ``OUT/manifest.csv`` up to date as scenes
finish. The pieces are Dask's own:

* the model is loaded once per worker and reused by every task there, through a worker plugin
  (:class:`ModelCache`) keyed by the model file's path, size and modification time;
* a task that raises an unexpected error is retried (``retries=``), and the tasks of a worker
  that dies are rescheduled elsewhere by the scheduler, so a lost worker does not lose scenes;
* ``resources=`` maps onto Dask resource annotations (``dask worker --resources GPU=1``).

Resume rests on one rule: a scene folder is done only when its ``_SUCCESS`` marker exists and
every output it lists still has the size and SHA-256 recorded there. The marker is written
last, atomically, after the outputs it vouches for, so a crash at any point leaves a folder
that the next run recognises as unfinished and redoes.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from distributed.diagnostics.plugin import WorkerPlugin

from geovae.atomic import check_output_dir, sha256, write_text
from geovae.errors import ClusterError, GeovaeError, ModelFileError, OptionError

if TYPE_CHECKING:
    from distributed import Client, Worker

    from geovae.model.base import ModelInfo, SegmentationModel

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
MARKER_NAME = "_SUCCESS"
MANIFEST_COLUMNS = ("scene", "status", "error", "started", "finished", "seconds", "worker", "outputs")
PLUGIN_NAME = "geovae-model-cache"
MARKER_VERSION = 1

#: segment_scene options that change what is written, so a marker made with other values
#: must not be trusted on resume. ``device``, ``batch_size`` and ``progress`` only change how
#: fast it is written.
_NOT_IN_FINGERPRINT = frozenset({"device", "batch_size", "progress"})

#: Seconds between two manifest rewrites while scenes stream in; the final write is always made.
#: Rewriting a 10,000-row file after every scene would cost more than the scenes on a big run.
_MANIFEST_MIN_INTERVAL = 1.0


# --------------------------------------------------------------------------- results
@dataclass
class SceneRow:
    """One scene's line in the manifest.

    Attributes:
        scene: the scene path or URL as given.
        folder: name of its output folder under the batch's output directory.
        status: ``done``, ``failed``, ``skipped`` (finished by an earlier run) or ``pending``.
        error: one line saying why it failed; empty otherwise.
        started: ISO 8601 UTC time the work began (empty when none was done).
        finished: ISO 8601 UTC time it ended.
        seconds: wall time of the work on the worker.
        worker: address of the worker that did it.
        outputs: output files, relative to the batch's output directory.
    """

    scene: str
    folder: str
    status: str = "pending"
    error: str = ""
    started: str = ""
    finished: str = ""
    seconds: float = 0.0
    worker: str = ""
    outputs: list[str] = field(default_factory=list)

    def to_csv(self) -> dict[str, str]:
        """The manifest's columns; outputs joined by ``;``."""
        return {
            "scene": self.scene,
            "status": self.status,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
            "seconds": f"{self.seconds:.3f}" if self.started else "",
            "worker": self.worker,
            "outputs": ";".join(self.outputs),
        }


@dataclass
class BatchResult:
    """What :func:`run_batch` did.

    Attributes:
        manifest: path of ``manifest.csv``.
        done: scenes segmented by this run.
        failed: scenes that failed (their rows say why).
        skipped: scenes already complete from an earlier run.
        rows: one row per scene, in input order.
        dashboard: the Dask dashboard link, when the cluster has one.
    """

    manifest: Path
    done: int
    failed: int
    skipped: int
    rows: list[SceneRow]
    dashboard: str | None = None

    @property
    def ok(self) -> bool:
        """True when no scene failed."""
        return self.failed == 0


# ---------------------------------------------------------------------- small helpers
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def one_line(exc: BaseException) -> str:
    """A single line describing ``exc``: its message for a geovae error, else ``Type: message``."""
    text = " ".join(str(exc).split()) or repr(exc)
    if not isinstance(exc, GeovaeError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 500 else text[:497] + "..."


def _is_url(scene: str) -> bool:
    # A Windows drive letter parses as a one-letter scheme; only real schemes count.
    scheme = urlparse(scene).scheme
    return len(scheme) > 1 or scene.startswith("/vsi")


def _stem(scene: str) -> str:
    # The same stem segment_scene gives its outputs (Scene.stem), so OUT/<stem>/<stem>.*.
    name = (urlparse(scene).path if _is_url(scene) else scene).rstrip("/").split("/")[-1]
    for ext in (".tif", ".tiff", ".vrt", ".jp2", ".img", ".nc"):
        if name.lower().endswith(ext):
            return name[: -len(ext)] or "scene"
    return (name.rsplit(".", 1)[0] if "." in name else name) or "scene"


def scene_folders(scenes: Sequence[str]) -> list[str]:
    """Output folder name of each scene: its file stem, made unique where stems collide.

    Colliding stems get a short hash of the full path, so a scene keeps the same folder
    whatever else is in the list and in whatever order: resume depends on it.

    Args:
        scenes: scene paths or URLs.

    Returns:
        One folder name per scene, in order.
    """
    stems = [_stem(s) for s in scenes]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out = []
    for scene, stem in zip(scenes, stems, strict=True):
        if counts[stem] > 1:
            key = scene if _is_url(scene) else str(Path(scene).resolve())
            stem = f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        out.append(stem)
    return out


def read_scene_list(path: str | Path) -> list[str]:
    """Scenes named in a list file: one per line; blank lines and ``#`` comments are ignored.

    Relative paths are taken relative to the list file's folder, so a list travels with its
    scenes whatever the working directory.

    Raises:
        OptionError: if the list file cannot be read.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"--list {path}: cannot read it ({e.__class__.__name__}); give a text file with one scene per line") from e
    scenes = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _is_url(line) and not Path(line).is_absolute():
            line = str(p.parent / line)
        scenes.append(line)
    return scenes


def write_manifest(path: str | Path, rows: Iterable[SceneRow]) -> None:
    """Write the manifest CSV atomically (a reader never sees half a file)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.to_csv())
    write_text(Path(path), buf.getvalue())


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """The manifest's rows as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def model_fingerprint(model: str | Path) -> dict[str, Any]:
    """What identifies a model file version: resolved path, size and modification time."""
    p = Path(model).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items())}
    return v


def run_fingerprint(model: str | Path, options: dict[str, Any]) -> dict[str, Any]:
    """The model version plus the options that change outputs; a marker must match it."""
    return {
        "model": model_fingerprint(model),
        "options": _jsonable({k: v for k, v in options.items() if k not in _NOT_IN_FINGERPRINT}),
    }


# ------------------------------------------------------------------------ the marker
def write_marker(
    folder: str | Path,
    scene: str,
    outputs: Iterable[str | Path],
    fingerprint: dict[str, Any],
    run: dict[str, Any] | None = None,
) -> Path:
    """Vouch for a finished scene: write ``folder/_SUCCESS`` after its outputs exist.

    The marker records each output's size and SHA-256, the scene and the run fingerprint, and
    is itself written atomically, so its presence means every byte it lists was on disk.

    Args:
        folder: the scene's output folder.
        scene: the scene as given.
        outputs: the output files (inside ``folder``).
        fingerprint: :func:`run_fingerprint` of the run.
        run: the batch run's id and this scene's manifest fields, so that a retry of the same
            task (whose result was lost with a dead worker) can answer without redoing it.

    Returns:
        The marker's path.
    """
    folder = Path(folder)
    files = {}
    for o in outputs:
        p = Path(o)
        files[p.name] = {"size": p.stat().st_size, "sha256": sha256(p)}
    doc = {
        "version": MARKER_VERSION,
        "scene": scene,
        "finished": _now(),
        "fingerprint": fingerprint,
        "outputs": files,
        "run": run or {},
    }
    marker = folder / MARKER_NAME
    write_text(marker, json.dumps(doc, indent=1))
    return marker


def check_marker(folder: str | Path, fingerprint: dict[str, Any] | None = None) -> list[Path] | None:
    """The outputs of a complete scene folder, or None if it must be (re)done.

    A folder is complete when its marker parses, was made by a run with the same fingerprint
    (when one is given), and every output it lists exists with the recorded size and SHA-256.
    """
    folder = Path(folder)
    try:
        doc = json.loads((folder / MARKER_NAME).read_text())
        if doc.get("version") != MARKER_VERSION:
            return None
        if fingerprint is not None and doc.get("fingerprint") != _jsonable(fingerprint):
            return None
        outputs = []
        for name, meta in doc["outputs"].items():
            p = folder / name
            if p.stat().st_size != meta["size"] or sha256(p) != meta["sha256"]:
                return None
            outputs.append(p)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return outputs or None


# ------------------------------------------------------------------ per-worker model cache
def _default_loader(path: str, device: str) -> SegmentationModel:
    from geovae.model.io import load_model

    return load_model(path, device=device)


class ModelCache(WorkerPlugin):
    """Models loaded on one worker, keyed by file path, size, mtime and device.

    Installed on every worker as a Dask worker plugin (see :func:`install_model_cache`), so
    each worker reads a model file once and every task there reuses it. A new version of the
    file (other size or mtime) replaces the old one, so a long-lived worker never serves
    stale weights.

    Attributes:
        loads: how many times a model file was read on this worker.
    """

    name = PLUGIN_NAME

    def __init__(self, loader: Callable[[str, str], SegmentationModel] | None = None) -> None:
        self.loader = loader
        self.loads = 0
        self._models: dict[tuple[str, int, int, str], SegmentationModel] = {}
        self._lock = threading.Lock()

    # Locks do not pickle; the plugin travels to the workers, so it is rebuilt on arrival.
    def __getstate__(self) -> dict[str, Any]:
        return {"loader": self.loader, "loads": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["loader"])  # type: ignore[misc]

    def setup(self, worker: Worker) -> None:
        """Called by Dask when the plugin is installed on a worker."""

    def teardown(self, worker: Worker) -> None:
        """Called by Dask when the worker closes: release the models (and their GPU memory)."""
        with self._lock:
            self._models.clear()

    def get(self, path: str | Path, device: str = "auto") -> SegmentationModel:
        """The model in ``path`` on ``device``, loaded on the first call only.

        Threads of one worker share the cache; the lock makes concurrent first calls load once.
        """
        fp = model_fingerprint(path)
        key = (fp["path"], fp["size"], fp["mtime_ns"], str(device))
        with self._lock:
            model = self._models.get(key)
            if model is None:
                loader = self.loader or _default_loader
                model = loader(fp["path"], str(device))
                # Drop older versions of this file on this device: their weights are stale.
                self._models = {k: v for k, v in self._models.items() if (k[0], k[3]) != (key[0], key[3])}
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
    cache = worker.plugins.get(PLUGIN_NAME)
    if cache is None:
        # A worker that joined without the plugin (or lost it); keep a cache on it anyway.
        cache = getattr(worker, "_geovae_model_cache", None)
        if cache is None:
            cache = ModelCache()
            worker._geovae_model_cache = cache  # type: ignore[attr-defined]
    return cache  # type: ignore[no-any-return]


def _plugin_loads(dask_worker: Worker) -> int:
    cache = dask_worker.plugins.get(PLUGIN_NAME) or getattr(dask_worker, "_geovae_model_cache", None)
    return cache.loads if cache is not None else 0


def model_loads(client: Client) -> dict[str, int]:
    """How many times each worker of ``client``'s cluster has read a model file."""
    return client.run(_plugin_loads)  # type: ignore[no-any-return]


def _plugin_installed(dask_scheduler: Any) -> bool:
    return PLUGIN_NAME in getattr(dask_scheduler, "worker_plugins", {})


def install_model_cache(client: Client, loader: Callable[[str, str], SegmentationModel] | None = None) -> None:
    """Install :class:`ModelCache` on every worker of ``client``'s cluster, present and future.

    Kept if already installed, so a long-lived cluster keeps its loaded models between batches.
    """
    try:
        installed = loader is None and client.run_on_scheduler(_plugin_installed)
    except Exception:  # noqa: BLE001 - a scheduler without geovae installed cannot run the check
        installed = False
    if installed:
        return
    client.register_plugin(ModelCache(loader), name=PLUGIN_NAME)


# ---------------------------------------------------------------------- the cluster
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
        except Exception as e:  # noqa: BLE001 - any failure to connect is the same user problem
            raise ClusterError(
                f"cannot reach the Dask scheduler at {where} within {connect_timeout:g} s ({one_line(e)}); "
                "check the address and that `dask scheduler` is running, or omit --scheduler for a local cluster"
            ) from e
        return client, None
    n = workers if workers is not None else min(2, os.cpu_count() or 1)
    if n < 1:
        raise OptionError(f"--workers {n}: must be at least 1")
    try:
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            # A random port: the default 8787 is often taken by another cluster on the machine.
            dashboard_address="127.0.0.1:0",
        )
    except Exception as e:  # noqa: BLE001
        raise ClusterError(f"cannot start a local Dask cluster of {n} workers ({one_line(e)}); try fewer --workers") from e
    try:
        client = Client(cluster, set_as_default=False, timeout=connect_timeout)
    except Exception as e:  # noqa: BLE001
        cluster.close()
        raise ClusterError(f"cannot connect to the local Dask cluster ({one_line(e)})") from e
    return client, cluster


# -------------------------------------------------------------------- the scene task
def segment_one(
    scene: str,
    model: str,
    folder: str,
    options: dict[str, Any],
    fingerprint: dict[str, Any],
    out_root: str,
    run_id: str = "",
) -> dict[str, Any]:
    """Segment one scene into ``folder`` and vouch for it with a marker; runs on a worker.

    A :class:`~geovae.errors.GeovaeError` (bad scene, model mismatch) is returned as a failed
    row rather than raised: it would fail the same way again, so Dask must not retry it.
    Anything else is raised, so Dask retries the task (on another worker if this one dies).

    Returns:
        A dict of :class:`SceneRow` fields.
    """
    from geovae.predict import segment_scene

    out = Path(folder)
    done = _done_by_this_run(out, fingerprint, run_id)
    if done is not None:
        return done
    t0 = time.perf_counter()
    row: dict[str, Any] = {"started": _now(), "worker": _worker_address()}
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Remove an old marker before touching outputs: a crash from here on must not leave a
        # marker vouching for files that are being rewritten.
        (out / MARKER_NAME).unlink(missing_ok=True)
        model_obj = worker_model_cache().get(model, options.get("device", "auto"))
        result = segment_scene(scene, model_obj, out, **{**options, "progress": False})
        files = sorted({Path(p) for p in result.outputs.values()})
        _finish_row(row, t0, status="done", error="", outputs=[os.path.relpath(p, out_root) for p in files])
        write_marker(out, scene, files, fingerprint, run={"id": run_id, "row": row})
    except GeovaeError as e:
        _finish_row(row, t0, status="failed", error=one_line(e), outputs=[])
    return row


def _finish_row(row: dict[str, Any], t0: float, **fields: Any) -> None:
    """Close a manifest row: its outcome, when it finished and how long it took."""
    row.update(fields, finished=_now(), seconds=time.perf_counter() - t0)


def _done_by_this_run(folder: Path, fingerprint: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """The row an earlier attempt of this very task recorded, if its outputs are intact.

    When a worker dies after finishing a scene but before the client fetched the result, the
    scheduler runs the task again; the scene need not be segmented twice.
    """
    if not run_id:
        return None
    try:
        doc = json.loads((folder / MARKER_NAME).read_text())
        if doc["run"]["id"] != run_id:
            return None
        row = dict(doc["run"]["row"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return row if check_marker(folder, fingerprint) is not None else None


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"local:{socket.gethostname()}:{os.getpid()}"


# ------------------------------------------------------------------ one huge scene
def split_plan(height: int, tile: int, overlap: int, block_size: int, parts: int) -> list[tuple[int, int]]:
    """Horizontal bands of a scene for ``split_scene``: ``(start, stop)`` output rows of each.

    Bands are whole rows of output blocks (:func:`geovae.stitch.block_side`, the rounding the
    stitcher uses), so each can be segmented alone with ``segment_scene(..., rows=(start,
    stop))``: that runs the tiles touching the band on the scene's own tile and block grid,
    and its rows equal the single-process run bit for bit. The cost is the halo: the tiles
    that cross a band line (about one tile of rows) run in both bands, so a band should be
    many tiles tall.

    Args:
        height: scene height in pixels.
        tile: tile side.
        overlap: tile overlap.
        block_size: the ``block_size`` option.
        parts: how many bands to aim for (the cluster's threads).

    Returns:
        The bands, top to bottom; they cover ``0:height`` exactly once.
    """
    from geovae.stitch import block_side

    block = block_side(block_size, tile - overlap)
    nblocks = math.ceil(height / block)
    per = math.ceil(nblocks / max(1, min(parts, nblocks)))
    return [(b0 * block, min(height, (b0 + per) * block)) for b0 in range(0, nblocks, per)]


def _open(scene: str, options: dict[str, Any]) -> Any:
    from geovae.scene import open_scene

    return open_scene(scene, nodata=options.get("nodata"), pixel_coords=bool(options.get("pixel_coords", False)))


def segment_band(scene: str, model: str, part_dir: str, start: int, stop: int, options: dict[str, Any]) -> dict[str, Any]:
    """Segment rows ``start:stop`` of a scene into rasters under ``part_dir``; runs on a worker.

    Returns:
        ``{"rasters": {kind: path}, "tiles": tile counts}`` of the band.
    """
    from geovae.predict import segment_scene

    model_obj = worker_model_cache().get(model, options.get("device", "auto"))
    opts = {**options, "formats": [], "quicklook": False, "progress": False, "rows": (start, stop)}
    res = segment_scene(scene, model_obj, part_dir, **opts)
    return {"rasters": {k: str(v) for k, v in res.outputs.items() if k != "report"}, "tiles": res.report["tiles"]}


def assemble_split(
    scene: str,
    model: str,
    folder: str,
    bands: list[tuple[int, int]],
    parts: list[dict[str, Any]],
    options: dict[str, Any],
    fingerprint: dict[str, Any],
    out_root: str,
    run_id: str = "",
) -> dict[str, Any]:
    """Join the band rasters of one scene into its final outputs, vectorise once, write the marker.

    Runs on a worker after every :func:`segment_band` task of the scene. The band rasters go
    block by block through :meth:`geovae.stitch.Stitcher.write_block` (same creation options,
    colour table, tags, overviews and class areas as the single-process run), then
    :func:`geovae.predict.finish_outputs` writes the polygons, quicklook and report.

    Returns:
        A dict of :class:`SceneRow` fields.
    """
    import shutil

    import rasterio
    from rasterio.windows import Window

    from geovae.predict import finish_outputs, report_options, tiling
    from geovae.stitch import Stitcher
    from geovae.tiling import TileGrid

    out = Path(folder)
    done = _done_by_this_run(out, fingerprint, run_id)
    if done is not None:
        return done
    t0 = time.perf_counter()
    row: dict[str, Any] = {"started": _now(), "worker": _worker_address()}
    (out / MARKER_NAME).unlink(missing_ok=True)
    model_obj = worker_model_cache().get(model, options.get("device", "auto"))
    info = model_obj.info
    sc = _open(scene, options)
    tile, overlap = tiling(info, options.get("tile"), options.get("overlap"))
    samples = int(options.get("samples", 0))
    st = Stitcher(TileGrid(sc.height, sc.width, tile, overlap, stride=info.stride), out, sc.stem, info, sc.crs,
                  sc.transform, uncertainty=samples > 0, reconstruction=bool(options.get("reconstruction", False)),
                  block_size=int(options.get("block_size", 1024)))
    srcs: dict[str, Any] = {}
    try:
        band = -1
        for win in st.windows():  # in write order: the class areas add up as in one process
            r0 = int(win.row_off)
            if band < 0 or r0 >= bands[band][1]:
                for ds in srcs.values():
                    ds.close()
                band += 1
                srcs = {k: rasterio.open(p) for k, p in parts[band]["rasters"].items()}
            part_win = Window(win.col_off, r0 - bands[band][0], win.width, win.height)
            st.write_block(win, {k: ds.read(window=part_win) for k, ds in srcs.items()})
        tiles = {k: sum(p["tiles"][k] for p in parts) for k in ("tiles_total", "tiles_run", "tiles_skipped")}
        result = finish_outputs(
            sc, model_obj, st, formats=options.get("formats"), min_area=float(options.get("min_area", 0.0)),
            simplify=float(options.get("simplify", 0.0)), quicklook=bool(options.get("quicklook", True)),
            options=report_options(
                model_obj if options.get("precision") is None else model_obj.with_precision(options["precision"]),
                batch_size=options.get("batch_size", 8), samples=samples,
                reconstruction=bool(options.get("reconstruction", False)), tta=bool(options.get("tta", False)),
                rows=None),
            source=model, tiles={**tiles, "blocks_written": st.blocks_written, "block_size": st.B},
            extra={"split": {"bands": [{"rows": [a, b], "tiles": p["tiles"]} for (a, b), p in zip(bands, parts, strict=True)]}},
        )
    except BaseException:
        st.abort()
        raise
    finally:
        for ds in srcs.values():
            ds.close()
        sc.close()
    # The band folders live together under OUT/<stem>/.split-<run>/; all are spent now.
    for root in {Path(v).parent.parent for part in parts for v in part["rasters"].values()}:
        shutil.rmtree(root, ignore_errors=True)
    files = sorted(set(result.outputs.values()))
    _finish_row(row, t0, status="done", error="", outputs=[os.path.relpath(p, out_root) for p in files])
    write_marker(out, scene, files, fingerprint, run={"id": run_id, "row": row})
    return row


def _submit_split(
    client: Client,
    row: SceneRow,
    model: str,
    folder: str,
    options: dict[str, Any],
    fingerprint: dict[str, Any],
    out_root: str,
    run_id: str,
    info: ModelInfo,
    parts: int,
    *,
    retries: int,
    resources: dict[str, float] | None,
) -> Any:
    """Submit one scene as band tasks plus an assembling task; returns the latter's future."""
    from geovae.predict import tiling

    sc = _open(row.scene, options)
    tile, overlap = tiling(info, options.get("tile"), options.get("overlap"))
    bands = split_plan(sc.height, tile, overlap, int(options.get("block_size", 1024)), parts)
    part_root = Path(folder) / f".split-{run_id}"
    band_futs = [
        client.submit(segment_band, row.scene, model, str(part_root / f"band-{k}"), a, b, options,
                      key=f"geovae-band-{row.folder}-{k}-{run_id}", retries=retries, resources=resources, pure=False)
        for k, (a, b) in enumerate(bands)
    ]
    return client.submit(assemble_split, row.scene, model, folder, bands, band_futs, options, fingerprint, out_root,
                         run_id, key=f"geovae-scene-{row.folder}-{run_id}", retries=retries, resources=resources,
                         pure=False)


# --------------------------------------------------------------------- validation
def _check_segment_options(options: dict[str, Any]) -> None:
    from geovae.predict import segment_scene

    params = inspect.signature(segment_scene).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params) - {"progress"})
    if unknown:
        raise OptionError(f"unknown segment option(s) {', '.join(unknown)}; see `geovae segment --help`")


def precheck_scene(scene: str, in_channels: int | None, *, nodata: float | None = None,
                   pixel_coords: bool = False) -> str | None:
    """A one-line reason the scene cannot be segmented, or None if it looks usable.

    Cheap: reads the file's header only (no pixels), so a list of thousands of scenes is
    checked in seconds and bad ones never reach a worker.

    Args:
        scene: path or URL.
        in_channels: the model's band count, or None to skip that check.
        nodata: the ``nodata`` override the run uses.
        pixel_coords: whether scenes without a CRS are accepted.
    """
    from geovae.scene import open_scene

    try:
        sc = open_scene(scene, nodata=nodata, pixel_coords=pixel_coords)
    except GeovaeError as e:
        return one_line(e)
    if in_channels is not None and sc.count != in_channels:
        return (
            f"scene {scene} has {sc.count} band(s) but the model expects {in_channels}; "
            "use a model trained on this kind of scene"
        )
    return None


def _model_info(model: str | Path) -> ModelInfo:
    """The model's description, read once on the client (also proves the file is usable).

    A geovae file's header is enough; other formats (a TorchGeo checkpoint) are loaded on
    the CPU, which also validates them before any worker is bothered.
    """
    from geovae.model.io import load_model, read_model_info

    try:
        return read_model_info(str(model))
    except ModelFileError:
        return load_model(str(model), device="cpu").info


# ------------------------------------------------------------------------ run_batch
def run_batch(
    scenes: Sequence[str | Path],
    model: str | Path,
    out_dir: str | Path,
    *,
    scene_list: str | Path | None = None,
    scheduler: str | Client | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    resume: bool = True,
    retries: int = 2,
    split_scene: bool = False,
    connect_timeout: float = 10,
    resources: dict[str, float] | None = None,
    progress: bool = True,
    **segment_options: Any,
) -> BatchResult:
    """Segment many scenes on a Dask cluster, resumably, one output folder per scene.

    Args:
        scenes: scene paths or URLs.
        model: model file; it must be readable at the same path on the workers.
        out_dir: output root; every scene writes ``out_dir/<stem>/`` and the batch keeps
            ``out_dir/manifest.csv``. Workers must see it at the same path (a shared disk).
        scene_list: a file with more scenes, one per line.
        scheduler: a Dask scheduler address, a scheduler file or a ``distributed.Client``
            (left open); None starts a LocalCluster for this run.
        workers: LocalCluster worker processes (default ``min(2, cores)``).
        threads_per_worker: scenes each LocalCluster worker runs at once.
        resume: skip scenes whose folder holds a valid marker from a run with the same model
            and options; False redoes every scene.
        retries: extra attempts for a scene whose task raised an unexpected error.
        split_scene: spread each scene's blocks over the workers (for one huge scene).
        connect_timeout: seconds to wait for the scheduler.
        resources: Dask resources each scene task needs, e.g. ``{"GPU": 1}`` for workers
            started with ``--resources GPU=1``.
        progress: show the dashboard link and a progress bar over scenes.
        **segment_options: passed to :func:`geovae.predict.segment_scene`.

    Returns:
        The counts, the rows and the manifest path. Check ``result.failed``.

    Raises:
        OptionError: no scenes, unknown options, bad counts.
        OutputError: the output directory cannot be created or written.
        ModelFileError: the model file is unusable.
        ClusterError: the scheduler cannot be reached or the cluster cannot start.
    """
    all_scenes = [str(s) for s in scenes]
    if scene_list is not None:
        all_scenes += read_scene_list(scene_list)
    if not all_scenes:
        raise OptionError("no scenes given; pass scene paths or --list FILE")
    if retries < 0:
        raise OptionError(f"--retries {retries}: must be 0 or more")

    out = check_output_dir(out_dir).resolve()
    _check_segment_options(segment_options)
    model_path = Path(model)
    if not model_path.is_file():
        raise ModelFileError(f"--model {model}: no such file; give a geovae model file")
    info = _model_info(model_path)
    in_channels = info.in_channels
    fingerprint = run_fingerprint(model_path, segment_options)

    folders = scene_folders(all_scenes)
    rows = [SceneRow(scene=s, folder=f) for s, f in zip(all_scenes, folders, strict=True)]
    manifest = out / MANIFEST_NAME
    todo: list[int] = []
    for i, row in enumerate(rows):
        folder = out / row.folder
        if resume:
            done = check_marker(folder, fingerprint)
            if done is not None:
                row.status = "skipped"
                row.outputs = [os.path.relpath(p, out) for p in done]
                continue
        reason = precheck_scene(row.scene, in_channels, nodata=segment_options.get("nodata"),
                                pixel_coords=bool(segment_options.get("pixel_coords", False)))
        if reason is not None:
            row.status, row.error, row.finished = "failed", reason, _now()
            continue
        todo.append(i)

    dashboard = None
    if not todo:
        write_manifest(manifest, rows)
    else:
        # The manifest is first written once the cluster answers (in _run_on_cluster): an
        # unreachable scheduler must not leave a manifest of "pending" rows, or overwrite the
        # one a previous run left.
        dashboard = _run_on_cluster(
            rows, todo, out, str(model_path.resolve()), segment_options, fingerprint, manifest,
            split_info=info if split_scene else None, scheduler=scheduler, workers=workers, threads_per_worker=threads_per_worker,
            retries=retries, connect_timeout=connect_timeout, resources=resources, progress=progress,
        )
    write_manifest(manifest, rows)
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "failed", "skipped")}
    return BatchResult(manifest, counts["done"], counts["failed"], counts["skipped"], rows, dashboard)


def _run_on_cluster(
    rows: list[SceneRow],
    todo: list[int],
    out: Path,
    model: str,
    options: dict[str, Any],
    fingerprint: dict[str, Any],
    manifest: Path,
    *,
    split_info: ModelInfo | None,
    scheduler: str | Client | None,
    workers: int | None,
    threads_per_worker: int,
    retries: int,
    connect_timeout: float,
    resources: dict[str, float] | None,
    progress: bool,
) -> str | None:
    from distributed import as_completed

    client, cluster = connect(
        scheduler, workers=workers, threads_per_worker=threads_per_worker, connect_timeout=connect_timeout
    )
    dashboard = client.dashboard_link if getattr(client, "dashboard_link", None) else None
    try:
        write_manifest(manifest, rows)
        install_model_cache(client)
        log.info("Dask dashboard: %s", dashboard)
        run_id = uuid.uuid4().hex[:8]
        futures = {}
        parts = sum(client.nthreads().values()) or 1
        for i in todo:
            row = rows[i]
            folder = str(out / row.folder)
            if split_info is None:
                fut = client.submit(
                    segment_one, row.scene, model, folder, options, fingerprint, str(out), run_id,
                    key=f"geovae-scene-{row.folder}-{run_id}", retries=retries, resources=resources, pure=False,
                )
            else:
                fut = _submit_split(client, row, model, folder, options, fingerprint, str(out), run_id,
                                    split_info, parts, retries=retries, resources=resources)
            futures[fut] = i
        with _Progress(len(rows), progress, dashboard) as bar:
            bar.advance(len(rows) - len(todo))
            last_write = 0.0
            for fut in as_completed(futures, loop=client.loop):
                row = rows[futures[fut]]
                try:
                    res = fut.result()
                    for k, v in res.items():
                        setattr(row, k, v)
                except Exception as e:  # noqa: BLE001 - a scene's failure is recorded, not raised
                    row.status, row.error, row.finished = "failed", one_line(e), _now()
                bar.advance(1, row)
                fut.release()
                if time.monotonic() - last_write >= _MANIFEST_MIN_INTERVAL:
                    write_manifest(manifest, rows)
                    last_write = time.monotonic()
    finally:
        if client is not scheduler:  # a Client the caller gave stays theirs
            client.close()
        if cluster is not None:
            cluster.close()
    return dashboard


class _Progress:
    """A rich progress bar over scenes (or nothing when progress is off)."""

    def __init__(self, total: int, enabled: bool, dashboard: str | None) -> None:
        self.enabled = enabled
        self.total = total
        self.dashboard = dashboard
        self._bar: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            if self.dashboard:
                console.print(f"Dask dashboard: {self.dashboard}")
            self._bar = Progress(
                TextColumn("scenes"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[last]}"), console=console,
            )
            self._bar.start()
            self._task = self._bar.add_task("scenes", total=self.total, last="")
        return self

    def advance(self, n: int, row: SceneRow | None = None) -> None:
        if self._bar is not None and n:
            last = f"{row.folder}: {row.status}" if row is not None else ""
            self._bar.update(self._task, advance=n, last=last)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
