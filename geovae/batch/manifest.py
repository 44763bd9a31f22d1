"""The batch's records: manifest rows, scene folders, resume markers and fingerprints."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from geovae.atomic import sha256, write_text
from geovae.errors import OptionError
from geovae.scene import is_remote, scene_stem
from geovae.sources.stack import StackedSource

MANIFEST_NAME = "manifest.csv"
MARKER_NAME = "_SUCCESS"
MANIFEST_COLUMNS = ("scene", "status", "error", "started", "finished", "seconds", "worker", "outputs")
#: Version 2 added the scene's identity to the fingerprint: version-1 markers are redone.
MARKER_VERSION = 2

#: Bytes of a local scene hashed into its fingerprint: its header and first blocks. A
#: replaced scene differs there (or in size or modification time) in every realistic case,
#: and hashing a few hundred KB costs nothing next to segmenting the scene.
_SCENE_HASH_BYTES = 1 << 18


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
        catalog: ``catalog.json``, the STAC Catalog over the batch (None when no scene is done).
        collection: ``collection.json``, the STAC Collection of the scenes' Items.
    """

    manifest: Path
    done: int
    failed: int
    skipped: int
    rows: list[SceneRow]
    dashboard: str | None = None
    catalog: Path | None = None
    collection: Path | None = None

    @property
    def ok(self) -> bool:
        """True when no scene failed."""
        return self.failed == 0


# ---------------------------------------------------------------------- small helpers
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def scene_folders(scenes: Sequence[str | StackedSource]) -> list[str]:
    """Output folder name of each scene: its file stem, made unique where stems collide.

    Colliding stems get a short hash of the full path, so a scene keeps the same folder
    whatever else is in the list and in whatever order: resume depends on it.

    Args:
        scenes: scene paths or URLs, or stacked sources (a STAC Item's stem is its id).

    Returns:
        One folder name per scene, in order.
    """
    stems = [scene_stem(s) for s in scenes]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out = []
    for scene, stem in zip(scenes, stems, strict=True):
        if counts[stem] > 1:
            if isinstance(scene, StackedSource):
                key = scene.name
            else:
                key = scene if is_remote(scene) else str(Path(scene).resolve())
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
        raise OptionError(
            f"--list {path}: cannot read it ({e.__class__.__name__}); give a text file with one scene per line"
        ) from e
    scenes = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not is_remote(line) and not Path(line).is_absolute():
            line = str(p.parent / line)
        scenes.append(line)
    return scenes


#: File suffixes taken as scenes when a folder is given (GeoTIFF, VRT, JPEG 2000, ERDAS IMAGINE).
SCENE_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


def expand_scenes(paths: Iterable[str | Path]) -> list[str]:
    """Scenes from paths, URLs and folders: a folder stands for the rasters directly in it.

    A folder contributes its files whose suffix is one of :data:`SCENE_SUFFIXES`, sorted by
    name, leaving out geovae's own outputs (``*.classes.tif`` and the other rasters a run
    writes), so a folder segmented into itself is not segmented again.

    Raises:
        OptionError: a folder holds no scene.
    """
    from geovae.products import KINDS, RASTER_KINDS

    outputs = tuple(f".{KINDS[k]}" for k in RASTER_KINDS)
    out: list[str] = []
    for p in paths:
        s = str(p)
        if not is_remote(s) and Path(s).is_dir():
            found = sorted(
                str(f)
                for f in Path(s).iterdir()
                if f.is_file() and f.suffix.lower() in SCENE_SUFFIXES and not f.name.endswith(outputs)
            )
            if not found:
                raise OptionError(
                    f"folder {s} holds no scene ({', '.join(SCENE_SUFFIXES)}); give scene files or a folder of them"
                )
            out += found
        else:
            out.append(s)
    return out


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
    """What identifies a model file version: resolved path, size and modification time.

    A TorchGeo weight set (``torchgeo:NAME``) keeps its reference as ``path`` (what a
    worker loads) with the size and modification time of its file in torch.hub's cache
    (zero when that cache has none: the worker then downloads it).
    """
    from geovae.model.pretrained import is_reference, weight_set

    if is_reference(model):
        try:
            st = weight_set(str(model)).file.stat()
        except OSError:
            return {"path": str(model), "size": 0, "mtime_ns": 0}
        return {"path": str(model), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
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


def scene_fingerprint(scene: str | StackedSource) -> dict[str, Any]:
    """What identifies a scene's version.

    A local file: its resolved path, size, modification time and the SHA-256 of its first
    bytes. A URL: the size, ETag and modification time its server gives
    (:func:`geovae.sources.remote.remote_identity`). A stack (a STAC Item's assets): the
    Item's id and URL, each member's own fingerprint, the pixel size and the area.
    """
    if isinstance(scene, StackedSource):
        return {
            "item": (scene.item or {}).get("id"),
            "name": scene.name,
            "rasters": [{"key": r.key, **scene_fingerprint(r.href)} for r in scene.rasters],
            "resolution": scene.resolution,
            "area": _jsonable(scene.area),
            "error": scene.error,
        }
    if is_remote(scene):
        from geovae.sources.remote import remote_identity

        return remote_identity(scene)
    p = Path(scene).resolve()
    try:
        st = p.stat()
        with open(p, "rb") as f:
            head = hashlib.sha256(f.read(_SCENE_HASH_BYTES)).hexdigest()
    except OSError:
        return {"path": str(p), "missing": True}
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


def run_fingerprint(model: str | Path, options: Any, scene: str | StackedSource | None = None) -> dict[str, Any]:
    """The model version, the options that change outputs and the scene; a marker must match it.

    Args:
        model: the model file.
        options: a :class:`~geovae.segment.SegmentOptions` (its :meth:`fingerprint`) or a
            mapping of option values.
        scene: the scene path or URL, or None for a fingerprint of the run alone.
    """
    from geovae.segment.options import SPEED_ONLY

    opts = (
        options.fingerprint()
        if hasattr(options, "fingerprint")
        else {k: v for k, v in dict(options).items() if k not in SPEED_ONLY}
    )
    fp = {"model": model_fingerprint(model), "options": _jsonable(opts)}
    if scene is not None:
        fp["scene"] = scene_fingerprint(scene)
    return fp


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
