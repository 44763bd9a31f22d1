"""Many scenes, or one huge scene, on a dask.distributed cluster.

:func:`run_batch` sends one task per scene to a Dask cluster (a ``LocalCluster`` it starts,
or any running scheduler), writes every scene's outputs under ``OUT/<scene-stem>/`` exactly as
:func:`geovae.segment.segment_scene` does, and keeps ``OUT/manifest.csv`` up to date as scenes
finish. The pieces are Dask's own:

* the model is loaded once per worker and reused by every task there, through a worker plugin
  (:class:`ModelCache`) keyed by the model file's path, size and modification time;
* a task that raises an unexpected error is retried (``retries=``), and the tasks of a worker
  that dies are rescheduled elsewhere by the scheduler, so a lost worker does not lose scenes;
* ``resources=`` maps onto Dask resource annotations (``dask worker --resources GPU=1``).

Resume rests on one rule: a scene folder is done only when its ``_SUCCESS`` marker exists, was
made for the same model file, the same output-changing options and the same scene (its size,
modification time and a hash of its first bytes), and every output it lists still has the size
and SHA-256 recorded there. The marker is written
last, atomically, after the outputs it vouches for, so a crash at any point leaves a folder
that the next run recognises as unfinished and redoes.

The modules: :mod:`~geovae.batch.manifest` (rows, the manifest, markers, fingerprints),
:mod:`~geovae.batch.cluster` (connecting, the per-worker model cache), :mod:`~geovae.batch.tasks`
(what runs on a worker) and :mod:`~geovae.batch.run` (:func:`run_batch`).
"""

from geovae.batch.cluster import PLUGIN_NAME, ModelCache, connect, install_model_cache, model_loads, worker_model_cache
from geovae.batch.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    MARKER_NAME,
    MARKER_VERSION,
    SCENE_SUFFIXES,
    BatchResult,
    SceneRow,
    check_marker,
    expand_scenes,
    model_fingerprint,
    read_manifest,
    read_scene_list,
    run_fingerprint,
    scene_fingerprint,
    scene_folders,
    write_manifest,
    write_marker,
)
from geovae.batch.run import precheck_scene, run_batch
from geovae.batch.tasks import SceneTask, assemble_split, segment_band, segment_one, split_plan
from geovae.errors import one_line

__all__ = [
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "MARKER_NAME",
    "MARKER_VERSION",
    "PLUGIN_NAME",
    "SCENE_SUFFIXES",
    "BatchResult",
    "ModelCache",
    "SceneRow",
    "SceneTask",
    "assemble_split",
    "check_marker",
    "connect",
    "expand_scenes",
    "install_model_cache",
    "model_fingerprint",
    "model_loads",
    "one_line",
    "precheck_scene",
    "read_manifest",
    "read_scene_list",
    "run_batch",
    "run_fingerprint",
    "scene_fingerprint",
    "scene_folders",
    "segment_band",
    "segment_one",
    "split_plan",
    "worker_model_cache",
    "write_manifest",
    "write_marker",
]
