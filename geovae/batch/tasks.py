"""What runs on a worker: one scene, or the row bands of one huge scene and their assembly."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geovae.batch.cluster import worker_model_cache
from geovae.batch.manifest import MARKER_NAME, _now, check_marker, write_marker
from geovae.errors import AreaOutsideSceneError, GeovaeError, one_line
from geovae.segment.options import SegmentOptions
from geovae.sources.stack import StackedSource


@dataclass(frozen=True)
class SceneTask:
    """One scene of a batch, as the tasks that segment it take it (it pickles to a worker).

    Attributes:
        scene: the scene's path or URL, or its stacked source.
        model: the model file (or ``torchgeo:NAME``) the worker loads through its cache.
        folder: the scene's output folder.
        options: the batch's segment options.
        fingerprint: what the scene's marker records, for resume
            (:func:`~geovae.batch.manifest.run_fingerprint`).
        out_root: the batch's output folder (a row's outputs are relative to it).
        run_id: the batch run's id: a retry of a task of this run that already finished
            answers from its marker. Empty: always segment.
    """

    scene: str | StackedSource
    model: str
    folder: str
    options: SegmentOptions
    fingerprint: dict[str, Any]
    out_root: str
    run_id: str = ""


def segment_one(task: SceneTask) -> dict[str, Any]:
    """Segment one scene into its folder and vouch for it with a marker; runs on a worker.

    Returns:
        A dict of :class:`SceneRow` fields (see :func:`_scene_task`).
    """
    from geovae.segment import segment_scene

    return _scene_task(task, lambda m: segment_scene(task.scene, m, task.folder, task.options.replace(progress=False)))


def _scene_task(task: SceneTask, produce: Any) -> dict[str, Any]:
    """What every scene task does around ``produce(model) -> SegmentResult``.

    A :class:`~geovae.errors.GeovaeError` (bad scene, model mismatch) is returned as a failed
    row rather than raised: it would fail the same way again, so Dask must not retry it. A
    scene whose clipped area holds no valid pixel is returned as skipped.
    Anything else is raised, so Dask retries the task (on another worker if this one dies).
    A retry of a task that already finished (its worker died before the result came back)
    answers from the marker without redoing the scene.
    """
    out = Path(task.folder)
    done = _done_by_this_run(out, task.fingerprint, task.run_id)
    if done is not None:
        return done
    t0 = time.perf_counter()
    row: dict[str, Any] = {"started": _now(), "worker": _worker_address()}
    try:
        # Remove an old marker before touching outputs: a crash from here on must not leave a
        # marker vouching for files that are being rewritten.
        (out / MARKER_NAME).unlink(missing_ok=True)
        result = produce(worker_model_cache().get(task.model, task.options.device, task.options.backend))
        files = sorted({Path(p) for p in result.outputs.values()})
        _finish_row(row, t0, status="done", error="", outputs=[os.path.relpath(p, task.out_root) for p in files])
        write_marker(out, str(task.scene), files, task.fingerprint, run={"id": task.run_id, "row": row})
    except AreaOutsideSceneError as e:
        _finish_row(row, t0, status="skipped", error=one_line(e), outputs=[])
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

    Bands are whole rows of output blocks (:func:`geovae.blend.block_side`, the rounding the
    block grid uses), so each can be segmented alone with :func:`geovae.segment.segment_rows`:
    that runs the tiles touching the band on the scene's own tile and block grid, and its rows
    equal the single-process run bit for bit. The cost is the halo: the tiles that cross a
    band line (about one tile of rows) run in both bands, so a band should be many tiles tall.

    Args:
        height: scene height in pixels.
        tile: tile side.
        overlap: tile overlap.
        block_size: the ``block_size`` option.
        parts: how many bands to aim for (the cluster's threads).

    Returns:
        The bands, top to bottom; they cover ``0:height`` exactly once.
    """
    from geovae.blend import block_side

    block = block_side(block_size, tile - overlap)
    nblocks = math.ceil(height / block)
    per = math.ceil(nblocks / max(1, min(parts, nblocks)))
    return [(b0 * block, min(height, (b0 + per) * block)) for b0 in range(0, nblocks, per)]


def segment_band(
    scene: str | StackedSource, model: str, part_dir: str, start: int, stop: int, options: SegmentOptions
) -> dict[str, Any]:
    """Segment rows ``start:stop`` of a scene into rasters under ``part_dir``; runs on a worker.

    Returns:
        ``{"rasters": {kind: path}, "tiles": tile counts}`` of the band.
    """
    from geovae.segment import segment_rows

    model_obj = worker_model_cache().get(model, options.device, options.backend)
    return segment_rows(scene, model_obj, part_dir, (start, stop), options)


def assemble_split(task: SceneTask, bands: list[tuple[int, int]], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the band rasters of one scene into its final outputs, vectorise once, write the marker.

    Runs on a worker after every :func:`segment_band` task of the scene, through
    :func:`geovae.segment.assemble_rows` (the same outputs a single run writes).

    Args:
        task: the scene.
        bands: the row bands (:func:`split_plan`).
        parts: what each band's :func:`segment_band` returned, in the same order.

    Returns:
        A dict of :class:`SceneRow` fields.
    """
    from geovae.segment import assemble_rows

    def produce(m: Any) -> Any:
        result = assemble_rows(task.scene, m, task.folder, bands, parts, task.options)
        # The band folders live together under OUT/<stem>/.split-<run>/; all are spent now.
        for root in {Path(v).parent.parent for part in parts for v in part["rasters"].values()}:
            shutil.rmtree(root, ignore_errors=True)
        return result

    return _scene_task(task, produce)
