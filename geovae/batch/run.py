"""run_batch: check everything on the client, then hand the scenes to the cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geovae import signals
from geovae.atomic import check_not_inputs, check_output_dir, clear_abandoned, created_folder
from geovae.batch.cluster import connect, install_model_cache
from geovae.batch.manifest import (
    MANIFEST_NAME,
    BatchResult,
    SceneRow,
    _now,
    check_marker,
    read_scene_list,
    run_fingerprint,
    scene_folders,
    write_manifest,
)
from geovae.batch.tasks import SceneTask, assemble_split, segment_band, segment_one, split_plan
from geovae.errors import AreaOutsideSceneError, GeovaeError, ModelFileError, OptionError, one_line
from geovae.model.pretrained import is_reference
from geovae.segment.options import SegmentOptions
from geovae.sources.stack import StackedSource
from geovae.stac import CATALOG_NAME, COLLECTION_NAME

if TYPE_CHECKING:
    from distributed import Client

    from geovae.model.base import ModelInfo

log = logging.getLogger("geovae.batch")

#: Seconds between two looks at the scene tasks (and at a stop request).
_POLL_S = 0.1
#: Seconds between two manifest rewrites while scenes stream in; the final write is always made.
#: Rewriting a 10,000-row file after every scene would cost more than the scenes on a big run.
_MANIFEST_MIN_INTERVAL = 1.0


# --------------------------------------------------------------------- validation
def precheck_scene(
    scene: str | StackedSource,
    in_channels: int | None,
    *,
    nodata: float | None = None,
    pixel_coords: bool = False,
    bands: tuple[int, ...] | None = None,
    info: ModelInfo | None = None,
) -> str | None:
    """A one-line reason the scene cannot be segmented, or None if it looks usable.

    Cheap: reads the file's header only (no pixels), so a list of thousands of scenes is
    checked in seconds and bad ones never reach a worker.

    Args:
        scene: path or URL, or a stacked source (a STAC Item's assets).
        in_channels: the model's band count, or None to skip that check.
        nodata: the ``nodata`` override the run uses.
        pixel_coords: whether scenes without a CRS are accepted.
        bands: the ``--bands`` the run reads.
        info: the model's description, whose band names the refusal names.

    Raises:
        AreaOutsideSceneError: the area to segment holds none of the scene's pixels (the
            scene is skipped, not failed).
    """
    from geovae.scene import open_scene
    from geovae.segment.trust import band_mismatch

    try:
        sc = open_scene(scene, nodata=nodata, pixel_coords=pixel_coords, bands=bands)
    except AreaOutsideSceneError:
        raise
    except GeovaeError as e:
        return one_line(e)
    if in_channels is not None and sc.count != in_channels:
        if info is not None:
            return band_mismatch(str(scene), sc.count, info, bands is not None)
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

    if is_reference(model):
        return load_model(str(model), device="cpu").info
    try:
        return read_model_info(str(model))
    except ModelFileError:
        return load_model(str(model), device="cpu").info


# ------------------------------------------------------------------------ run_batch
def run_batch(
    scenes: Sequence[str | Path | StackedSource],
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
    options: SegmentOptions | None = None,
    search: dict[str, Any] | None = None,
    **segment_options: Any,
) -> BatchResult:
    """Segment many scenes on a Dask cluster, resumably, one output folder per scene.

    Args:
        scenes: scene paths or URLs, or stacked sources (a STAC Item's assets, see
            :mod:`geovae.sources`), each one scene of the batch named by its Item's URL.
        model: model file, readable at the same path on the workers; or ``torchgeo:NAME``,
            a TorchGeo weight set (downloaded here if needed; workers load it from their
            torch.hub cache, which a local cluster shares).
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
        options: the :class:`~geovae.segment.SegmentOptions` of every scene; keyword
            arguments (the same names) override its fields. Checked here, once.
        search: the STAC search the scenes came from (:meth:`geovae.sources.Search.describe`),
            recorded in the batch's Collection.
        **segment_options: see ``options``.

    Returns:
        The counts, the rows and the manifest path. Check ``result.failed``.

    Raises:
        OptionError: no scenes, unknown options, bad counts.
        OutputError: the output directory cannot be created or written, or the manifest or
            catalog it would write is one of the inputs (the scene list, the model).
        ModelFileError: the model file is unusable.
        ClusterError: the scheduler cannot be reached or the cluster cannot start.
    """
    all_scenes: list[str | StackedSource] = [s if isinstance(s, StackedSource) else str(s) for s in scenes]
    if scene_list is not None:
        all_scenes += read_scene_list(scene_list)
    if not all_scenes:
        raise OptionError("no scenes given; pass scene paths or --list FILE")
    if retries < 0:
        raise OptionError(f"--retries {retries}: must be 0 or more")

    # Made only once the model and options pass, and removed again if the run fails before
    # writing into it: a refused or failed batch leaves no empty folder behind.
    out = check_output_dir(out_dir, create=False).resolve()
    check_not_inputs(
        [out / MANIFEST_NAME, out / CATALOG_NAME, out / COLLECTION_NAME],
        [scene_list, None if is_reference(model) else model, *(s for s in all_scenes if isinstance(s, str))],
    )
    opts = SegmentOptions.from_kwargs(options, **segment_options)
    if is_reference(model):
        # Loaded here first: the weights are downloaded once, into the cache local workers share.
        model_ref = str(model)
    else:
        model_path = Path(model)
        if not model_path.is_file():
            raise ModelFileError(f"--model {model}: no such file; give a geovae model file")
        model_ref = str(model_path.resolve())
    info = _model_info(model_ref)
    in_channels = info.in_channels
    with created_folder(out):
        sources = {str(s): s for s in all_scenes}
        fingerprints = {name: run_fingerprint(model_ref, opts, s) for name, s in sources.items()}

        folders = scene_folders(all_scenes)
        rows = [SceneRow(scene=str(s), folder=f) for s, f in zip(all_scenes, folders, strict=True)]
        manifest = out / MANIFEST_NAME
        todo: list[int] = []
        for i, row in enumerate(rows):
            folder = out / row.folder
            if resume:
                done = check_marker(folder, fingerprints[row.scene])
                if done is not None:
                    row.status = "skipped"
                    row.outputs = [os.path.relpath(p, out) for p in done]
                    continue
            try:
                reason = precheck_scene(
                    sources[row.scene],
                    in_channels,
                    nodata=opts.nodata,
                    pixel_coords=opts.pixel_coords,
                    bands=opts.bands,
                    info=info,
                )
            except AreaOutsideSceneError as e:
                row.status, row.error, row.finished = "skipped", one_line(e), _now()
                continue
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
                rows,
                todo,
                out,
                model_ref,
                opts,
                fingerprints,
                manifest,
                sources,
                split_info=info if split_scene else None,
                scheduler=scheduler,
                workers=workers,
                threads_per_worker=threads_per_worker,
                retries=retries,
                connect_timeout=connect_timeout,
                resources=resources,
                progress=progress,
            )
        write_manifest(manifest, rows)
        counts = {s: sum(r.status == s for r in rows) for s in ("done", "failed", "skipped")}
        catalog, collection = _write_stac(out, rows, search)
        return BatchResult(
            manifest,
            counts["done"],
            counts["failed"],
            counts["skipped"],
            rows,
            dashboard,
            catalog=catalog,
            collection=collection,
        )


def _write_stac(
    out: Path, rows: list[SceneRow], search: dict[str, Any] | None = None
) -> tuple[Path | None, Path | None]:
    """A STAC Catalog and Collection over the STAC Items of every finished scene (done now or
    earlier), in ``out`` (see :func:`geovae.stac.write_batch_catalog`)."""
    from geovae.stac import write_batch_catalog

    items = []
    for row in rows:
        if row.status in ("done", "skipped"):
            items += [out / p for p in row.outputs if str(p).endswith(".stac.json") and (out / p).is_file()]
    if not items:
        return None, None
    return write_batch_catalog(out, items, search=search)


def _run_on_cluster(
    rows: list[SceneRow],
    todo: list[int],
    out: Path,
    model: str,
    options: SegmentOptions,
    fingerprints: dict[str, dict[str, Any]],
    manifest: Path,
    sources: dict[str, str | StackedSource],
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
    dlog = logging.getLogger("distributed")
    dlevel = dlog.level
    run_id = uuid.uuid4().hex[:8]
    existed = {i: (out / rows[i].folder).exists() for i in todo}
    try:
        write_manifest(manifest, rows)
        install_model_cache(client)
        log.info("Dask dashboard: %s", dashboard)
        futures = {}
        parts = sum(client.nthreads().values()) or 1
        for i in todo:
            row = rows[i]
            task = SceneTask(
                sources[row.scene], model, str(out / row.folder), options, fingerprints[row.scene], str(out), run_id
            )
            if split_info is None:
                fut = client.submit(
                    segment_one,
                    task,
                    key=f"geovae-scene-{row.folder}-{run_id}",
                    retries=retries,
                    resources=resources,
                    pure=False,
                )
            else:
                fut = _submit_split(client, row, task, split_info, parts, retries=retries, resources=resources)
            futures[fut] = i
        with _Progress(len(rows), progress, dashboard) as bar:
            bar.advance(len(rows) - len(todo))
            last_write = 0.0
            pending = as_completed(futures, loop=client.loop)
            while not pending.is_empty():
                # Polled, not blocked on: a Ctrl-C or SIGTERM (a flag, geovae.signals) stops
                # the batch within a fraction of a second, not when the next scene ends.
                signals.check()
                ready = pending.next_batch(block=False)
                if not ready:
                    time.sleep(_POLL_S)
                    continue
                for fut in ready:
                    row = rows[futures[fut]]
                    try:
                        res = fut.result()
                        for k, v in res.items():
                            setattr(row, k, v)
                    except Exception as e:
                        row.status, row.error, row.finished = "failed", one_line(e), _now()
                    bar.advance(1, row)
                    fut.release()
                if time.monotonic() - last_write >= _MANIFEST_MIN_INTERVAL:
                    write_manifest(manifest, rows)
                    last_write = time.monotonic()
    except BaseException:
        if cluster is not None and not log.isEnabledFor(logging.DEBUG):
            # Stopped mid-scene (Ctrl-C, SIGTERM, an error): the local workers are killed
            # rather than waited for, and distributed's warning that it did so is expected.
            dlog.setLevel(logging.ERROR)
        raise
    finally:
        try:
            if client is not scheduler:  # a Client the caller gave stays theirs
                client.close()
            if cluster is not None:
                cluster.close()
        finally:
            dlog.setLevel(dlevel)
            _clear_scene_folders(
                out, [rows[i].folder for i in todo], [rows[i].folder for i in todo if not existed[i]], run_id
            )
    return dashboard


def _clear_scene_folders(out: Path, folders: list[str], new: list[str], run_id: str) -> None:
    """What this run's tasks left in its scene folders once they are over: the band rasters
    of split scenes (``.split-<run>``, spent once a scene is assembled, useless once it is
    not), and what workers killed mid-scene staged (a stopped batch kills its local workers,
    which cannot clean up; :func:`geovae.atomic.clear_abandoned`). A scene folder this run
    created and left empty goes too. Sets a live run still holds are left to it."""
    for name in folders:
        folder = out / name
        shutil.rmtree(folder / f".split-{run_id}", ignore_errors=True)
        try:
            if folder.is_dir():
                clear_abandoned(folder)
        except OSError as exc:
            log.warning("could not clear what stopped scene runs left in %s: %s", folder, exc)
    for name in new:
        with contextlib.suppress(OSError):
            (out / name).rmdir()  # only when empty


def _submit_split(
    client: Client,
    row: SceneRow,
    task: SceneTask,
    info: ModelInfo,
    parts: int,
    *,
    retries: int,
    resources: dict[str, float] | None,
) -> Any:
    """Submit one scene as band tasks plus an assembling task; returns the latter's future."""
    from geovae.scene import open_scene
    from geovae.segment.spec import tiling

    options = task.options
    sc = open_scene(task.scene, nodata=options.nodata, pixel_coords=options.pixel_coords)
    tile, overlap = tiling(options, info, sc.height, sc.width)
    bands = split_plan(sc.height, tile, overlap, options.block_size, parts)
    part_root = Path(task.folder) / f".split-{task.run_id}"
    band_futs = [
        client.submit(
            segment_band,
            task.scene,
            task.model,
            str(part_root / f"band-{k}"),
            a,
            b,
            options,
            key=f"geovae-band-{row.folder}-{k}-{task.run_id}",
            retries=retries,
            resources=resources,
            pure=False,
        )
        for k, (a, b) in enumerate(bands)
    ]
    return client.submit(
        assemble_split,
        task,
        bands,
        band_futs,
        key=f"geovae-scene-{row.folder}-{task.run_id}",
        retries=retries,
        resources=resources,
        pure=False,
    )


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
                TextColumn("scenes"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[last]}"),
                console=console,
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
