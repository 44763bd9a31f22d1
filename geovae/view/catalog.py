"""What there is to show: the scenes of a segment or batch output folder and their layers.

A segment output folder holds ``<stem>.json`` (the run report) whose ``"outputs"`` maps kinds
(``classes``, ``confidence``, ``uncertainty``, ``reconstruction_error``, ``geojson``,
``gpkg``, ``parquet``, ``quicklook``, ``report``) to paths, absolute or relative to the
report's folder. A batch folder has ``manifest.csv`` (one row per scene, its outputs
``;``-joined relative to the batch folder) or a STAC collection, and a sub-folder per scene.

Only files under the folder given are used: an output path that resolves outside it is left
out. The one exception is the input scene a report names, read (never served) for the RGB
layer; it is left out too when it is missing or remote (the viewer works offline).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from geovae.atomic import finish_commits, pending_commits
from geovae.errors import GeovaeError

log = logging.getLogger(__name__)

__all__ = ["POLYGON_KINDS", "RASTER_KINDS", "Catalog", "SceneEntry", "ViewError", "load_catalog"]

#: Raster layers in the order the page lists them, with the title it shows.
RASTER_KINDS = {
    "classes": "Classes",
    "confidence": "Confidence",
    "uncertainty": "Uncertainty (entropy)",
    "reconstruction_error": "Reconstruction error",
}
#: Polygon files, best first: a GeoPackage has a spatial index the viewer queries directly;
#: the others are copied into one (in a temporary folder) the first time polygons are asked for.
POLYGON_KINDS = ("gpkg", "parquet", "geojson")

MANIFEST_NAME = "manifest.csv"  # as geovae.batch writes it (not imported: batch pulls in dask)


class ViewError(GeovaeError, OSError):
    """The path given to the viewer holds nothing it can show."""


@dataclass
class SceneEntry:
    """One scene's outputs as the viewer shows them.

    Attributes:
        id: short name used in URLs (``s0``, ``s1``...).
        name: what the page calls the scene (its output stem or the manifest's scene).
        status: ``done``, or the manifest's status (``failed``, ``pending``...).
        error: why the scene has nothing to show (a failed batch row, no CRS...), else empty.
        report: the run report, when there is one.
        report_path: where it was read from.
        rasters: raster kind -> file.
        polygons: the polygon file the viewer queries, best of :data:`POLYGON_KINDS`.
        scene: the input scene (local, readable) for the RGB layer, else None.
        bounds: (west, south, east, north) in degrees, from the class raster (or another raster).
        classes: per class id, name, colour (r, g, b), and from the report pixels, area, fraction.
        area_unit: the report's area unit.
        files: output files under the root, relative to it, that may be downloaded.
    """

    id: str
    name: str
    status: str = "done"
    error: str = ""
    report: dict[str, Any] | None = None
    report_path: Path | None = None
    rasters: dict[str, Path] = field(default_factory=dict)
    polygons: Path | None = None
    scene: str | None = None
    bounds: tuple[float, float, float, float] | None = None
    classes: list[dict[str, Any]] = field(default_factory=list)
    area_unit: str = ""
    files: dict[str, str] = field(default_factory=dict)

    @property
    def nodata(self) -> float | None:
        """The scene nodata value the run used (``--nodata`` or the file's tag)."""
        v = ((self.report or {}).get("options") or {}).get("nodata")
        return None if v is None else float(v)

    @property
    def band_names(self) -> list[str] | None:
        """The model's band names, which help pick the RGB bands."""
        return ((self.report or {}).get("model") or {}).get("band_names")


@dataclass
class Catalog:
    """Everything the viewer serves from one folder.

    Attributes:
        root: the folder; no file outside it is served.
        kind: ``segment`` (one or a few reports), ``batch`` (a manifest) or ``stac``.
        scenes: the scenes, in the manifest's (or the folder's) order.
    """

    root: Path
    kind: str
    scenes: list[SceneEntry]

    def scene(self, sid: str) -> SceneEntry | None:
        """The scene with this id, or None."""
        return next((s for s in self.scenes if s.id == sid), None)


# ----------------------------------------------------------------------------- helpers
def _inside(root: Path, p: Path) -> bool:
    try:
        p.resolve().relative_to(root)
        return True
    except (ValueError, OSError):
        return False


def _resolve_output(value: str, report_dir: Path, root: Path) -> Path | None:
    """An output path of a report: relative to the report's folder, or absolute.

    An absolute path that no longer exists (the folder was moved or copied) is looked for by
    its name in the report's folder. Anything outside ``root`` is refused.
    """
    p = Path(value)
    candidates = [p] if p.is_absolute() else [report_dir / p]
    if p.is_absolute():
        candidates.append(report_dir / p.name)
    for c in candidates:
        if c.is_file():
            if _inside(root, c):
                return c.resolve()
            log.warning("ignoring %s: it is outside %s", c, root)
    return None


def _is_remote(path: str) -> bool:
    scheme = urlparse(path).scheme
    return path.startswith("/vsi") or len(scheme) > 1


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("outputs"), dict) else None


def _class_table(classes_tif: Path) -> list[dict[str, Any]]:
    """Class ids, names and colours from the class raster (the output contract's class table)."""
    import rasterio

    from geovae.products import read_class_table

    with rasterio.open(classes_tif) as ds:
        table = read_class_table(ds)
    return [
        {"id": cid, "name": c["name"], "color": list(c["color"] or (128, 128, 128))[:3]}
        for cid, c in sorted(table.items())
    ]


def _geographic_bounds(path: Path) -> tuple[float, float, float, float] | None:
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as ds:
        if ds.crs is None:
            return None
        b = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
    return b if all(math.isfinite(v) for v in b) else None


def _entry_from_report(sid: str, report_path: Path, root: Path, name: str | None = None) -> SceneEntry:
    report = _read_report(report_path)
    entry = SceneEntry(id=sid, name=name or report_path.stem, report_path=report_path)
    if report is None:
        entry.status, entry.error = "unreadable", f"{report_path.name} is not a geovae run report"
        return entry
    entry.report = report
    rdir = report_path.parent
    found: dict[str, Path] = {}
    for kind, value in report["outputs"].items():
        if isinstance(value, str):
            p = _resolve_output(value, rdir, root)
            if p is not None:
                found[kind] = p
    found.setdefault("report", report_path.resolve())
    entry.rasters = {k: found[k] for k in RASTER_KINDS if k in found}
    entry.polygons = next((found[k] for k in POLYGON_KINDS if k in found), None)
    entry.files = {k: p.relative_to(root).as_posix() for k, p in found.items()}
    entry.area_unit = str(report.get("area_unit", ""))
    scene = report.get("scene")
    scene = scene.get("path") if isinstance(scene, dict) else scene  # the demo's report names it directly
    if isinstance(scene, str) and scene and not _is_remote(scene) and Path(scene).is_file():
        entry.scene = scene
    if not entry.rasters:
        entry.error = "no output raster found next to the report"
        return entry
    ref = entry.rasters.get("classes") or next(iter(entry.rasters.values()))
    try:
        entry.bounds = _geographic_bounds(ref)
    except Exception as e:  # a broken raster must not stop the other scenes from showing
        entry.error = f"{ref.name} cannot be read: {e}"
        return entry
    if entry.bounds is None:
        entry.error = "the outputs have no CRS (--pixel-coords): a map needs georeferenced outputs"
        return entry
    if "classes" in entry.rasters:
        entry.classes = _class_table(entry.rasters["classes"])
    by_id = {int(c["id"]): c for c in report.get("classes") or [] if isinstance(c, dict) and "id" in c}
    for c in entry.classes:
        r = by_id.get(c["id"], {})
        c.update({k: r[k] for k in ("pixels", "fraction") if k in r})
        # the report names the area by its unit (area_m2, area_px); older reports say "area"
        area = next((r[k] for k in ("area_m2", "area_px", "area") if k in r), None)
        if area is not None:
            c["area"] = area
    return entry


def _reports_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if p.name != "collection.json" and _read_report(p) is not None)


# ----------------------------------------------------------------------------- kinds
def distinct_names(paths: list[str]) -> list[str]:
    """Short display names for scene paths or URLs: the file name, with as many of its
    folders (for a URL, then its host or bucket) as it takes to tell it from the others of
    the same name (``d1/y.tif`` and ``d2/y.tif``, ``b1/y.tif`` and ``b2/y.tif`` for
    ``s3://b1/y.tif`` and ``s3://b2/y.tif``), and `` (2)``, `` (3)``... for a name that is
    still shared: the same path listed again, or paths that differ only where no name shows
    it (a URL's query, a scheme)."""
    unique = list(dict.fromkeys(paths))

    def split(s: str) -> list[str]:
        u = urlparse(s)
        # A one-letter scheme is a Windows drive (C:\\...), not a URL's.
        host = [u.netloc] if u.netloc and len(u.scheme) > 1 else []
        return host + [p for p in u.path.replace("\\", "/").split("/") if p] or [s]

    parts = [split(s) for s in unique]
    depth = [1] * len(unique)

    def name(i: int) -> str:
        return "/".join(parts[i][-depth[i] :])

    while True:
        names = [name(i) for i in range(len(unique))]
        grow = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    short = dict(zip(unique, (name(i) for i in range(len(unique))), strict=True))
    taken = set(short.values())
    out: list[str] = []
    used: set[str] = set()
    for p in paths:
        shown, k = short[p], 1
        # (a scene may itself be called "y.tif (2)")
        while shown in used or (k > 1 and shown in taken):
            k += 1
            shown = f"{short[p]} ({k})"
        out.append(shown)
        used.add(shown)
    return out


def _from_manifest(root: Path) -> list[SceneEntry]:
    with open(root / MANIFEST_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    entries = []
    shown = distinct_names([row.get("scene", "") or f"scene {i + 1}" for i, row in enumerate(rows)])
    for i, row in enumerate(rows):
        scene = row.get("scene", "") or f"scene {i + 1}"
        name = shown[i]
        outputs = [o for o in (row.get("outputs") or "").split(";") if o]
        reports = [root / o for o in outputs if o.endswith(".json") and _inside(root, root / o)]
        if not reports:  # an older manifest without outputs: the scene's sub-folder
            reports = [
                r
                for d in sorted(root.iterdir())
                if d.is_dir()
                for r in _reports_in(d)
                if ((_read_report(r) or {}).get("scene") or {}).get("path") == scene
            ]
        status = row.get("status") or "unknown"
        if reports and reports[0].is_file():
            e = _entry_from_report(f"s{i}", reports[0], root, name=name)
            e.status = status
        else:
            e = SceneEntry(id=f"s{i}", name=name, status=status)
            e.error = row.get("error") or ("no outputs yet" if status in ("pending", "") else "no report found")
        if status == "failed" and not e.error:
            e.error = row.get("error") or "failed"
        entries.append(e)
    return entries


def _stac_items(collection: Path) -> list[Path]:
    d = json.loads(collection.read_text())
    return [
        collection.parent / unquote(link["href"])
        for link in d.get("links", [])
        if isinstance(link, dict)
        and link.get("rel") == "item"
        and isinstance(link.get("href"), str)
        and not _is_remote(link["href"])
    ]


def _from_stac(root: Path, collection: Path) -> list[SceneEntry]:
    """Scenes of a STAC collection: each item's report asset (a ``.json`` geovae report)."""
    entries = []
    items = _stac_items(collection)
    ids = []
    for item_path in items:
        try:
            ids.append(str(json.loads(item_path.read_text()).get("id") or item_path.stem))
        except (OSError, ValueError, AttributeError):
            ids.append(item_path.stem)
    # Items of the same id (scenes of one file name in several folders) are told apart by
    # their folders.
    shown = distinct_names([str(p.parent / i) for p, i in zip(items, ids, strict=True)])
    for i, item_path in enumerate(items):
        if not _inside(root, item_path) or not item_path.is_file():
            continue
        item = json.loads(item_path.read_text())
        hrefs = [unquote(str(a.get("href", ""))) for a in (item.get("assets") or {}).values() if isinstance(a, dict)]
        reports = [
            item_path.parent / h
            for h in hrefs
            if h.endswith(".json")
            and not _is_remote(h)
            and _inside(root, item_path.parent / h)
            and _read_report(item_path.parent / h) is not None
        ]
        name = shown[i]
        if reports:
            entries.append(_entry_from_report(f"s{i}", reports[0], root, name=name))
        else:
            entries.append(
                SceneEntry(id=f"s{i}", name=name, status="unknown", error="no geovae report among its assets")
            )
    return entries


def _find_collection(root: Path) -> Path | None:
    for p in sorted(root.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and d.get("type") == "Collection":
            return p
    return None


def load_catalog(path: str | Path) -> Catalog:
    """Find the scenes and layers under a segment folder, a batch folder or one report.

    Args:
        path: a segment output folder, a batch output folder (``manifest.csv`` or a STAC
            collection), or one run report (``<stem>.json``).

    Returns:
        The :class:`Catalog`.

    Raises:
        ViewError: the path does not exist or holds no report, manifest or collection.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ViewError(f"{path} does not exist; give a segment or batch output folder, or a report .json")
    if p.is_file():
        if _read_report(p) is None:
            raise ViewError(f'{path} is not a geovae run report (a .json with "outputs"); give the output folder')
        root = p.parent.resolve()
        return Catalog(root, "segment", [_entry_from_report("s0", p.resolve(), root)])
    root = p.resolve()
    pending = _finish_commits(root)
    if (root / MANIFEST_NAME).is_file():
        return Catalog(root, "batch", _from_manifest(root))
    collection = _find_collection(root)
    if collection is not None:
        return Catalog(root, "stac", _from_stac(root, collection))
    reports = _reports_in(root)
    if not reports and pending:
        raise ViewError(
            f"the outputs of {pending[0]} in {path} have no report yet: their run was killed while "
            "moving them into place, and this folder cannot be written to finish that; rerun the "
            "run, or run geovae view as a user who may write the folder"
        )
    if not reports:
        raise ViewError(
            f"{path} holds no geovae run report (<stem>.json), manifest.csv or STAC collection; "
            "give the folder `geovae segment --out` or `geovae batch --out` wrote"
        )
    entries = _one_per_run([_entry_from_report(f"s{i}", r, root) for i, r in enumerate(reports)], root)
    for i, e in enumerate(entries):
        e.id = f"s{i}"
    return Catalog(root, "segment", entries)


def _finish_commits(root: Path) -> list[str]:
    """Finish the commits runs killed in the middle of one left in ``root`` and in its scene
    folders (a batch's): their sets then show whole, with their reports. Returns the stems
    whose commit could not be finished (a folder that cannot be written)."""
    pending: list[str] = []
    for folder in [root, *(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))]:
        try:
            done = finish_commits(folder)
        except OSError:
            pending += pending_commits(folder)
            continue
        if done:
            log.info("finished the interrupted commit of %s in %s", ", ".join(done), folder)
    return pending


def _one_per_run(entries: list[SceneEntry], root: Path) -> list[SceneEntry]:
    """One entry per class raster: a report that wraps a run (the demo's ``demo.json`` lists
    the segment run's outputs, its report among them) gives way to the run's own report."""

    def key(e: SceneEntry) -> Path | str:
        return e.rasters.get("classes") or str(e.report_path)

    keep: dict[Path | str, SceneEntry] = {}
    for e in entries:
        own = "report" in e.files and (root / e.files["report"]).resolve() == e.report_path
        if key(e) not in keep or own:
            keep[key(e)] = e
    return [e for e in entries if keep[key(e)] is e]
