"""Polygons for the map: what is in view, simplified for the zoom, and the polygon under a click.

Queries go straight to the GeoPackage's R-tree (SQLite, read-only), so the cost of a view
depends on how many polygons are in it, not on the file: polygons smaller than a screen
pixels are skipped, the largest come first, at most :data:`MAX_FEATURES` and
:data:`MAX_VIEW_BYTES` of geometry per view, each
simplified to a pixel's size and reprojected to longitude/latitude for the page. A GeoJSON
or GeoParquet file (the outputs without an index) is copied once, in batches, into a
GeoPackage in a temporary folder the first time its polygons are asked for.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import shutil
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["MAX_FEATURES", "PolygonLayer", "metres_per_pixel"]

#: Polygons sent for one view at most; more are left out smallest first (the response says
#: ``truncated``). A canvas draws this many in well under a second.
MAX_FEATURES = 3000
#: Geometry read for one view at most, in WKB bytes (16 a vertex): the time a view takes is
#: about proportional to its vertices, not its polygons. The 3,000 largest polygons of the
#: 430k-polygon benchmark mosaic have 6 million pixel-exact vertices; this budget (half a
#: million) keeps a view near a tenth of a second.
MAX_VIEW_BYTES = 8 * 2**20
#: Polygons narrower and lower than this many screen pixels are not drawn: an outline that
#: small is a dot, and the class raster under it shows the same.
MIN_PIXELS = 3
#: Features kept ready to send again (GeoJSON text, by polygon and zoom).
CACHE_BYTES = 64 * 2**20
_EARTH_CIRCUMFERENCE = 2 * math.pi * 6378137.0
#: Envelope bytes after the 8-byte GeoPackage geometry header, by the header's envelope code.
_ENVELOPE_BYTES = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}
_COPY_BATCH = 20_000
_SQL_CHUNK = 10_000  # ids per IN (...): SQLite allows 32,766 parameters at most


def metres_per_pixel(zoom: float, lat: float) -> float:
    """Ground size of one Web Mercator pixel (256 px tiles) at a latitude."""
    return _EARTH_CIRCUMFERENCE * math.cos(math.radians(max(-85.0, min(85.0, lat)))) / (256 * 2**zoom)


def _wkb(blob: bytes) -> bytes:
    """The WKB inside a GeoPackage geometry blob (header: magic, version, flags, srs id, envelope)."""
    flags = blob[3]
    return bytes(blob[8 + _ENVELOPE_BYTES.get((flags >> 1) & 0b111, 0) :])


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _copy_to_gpkg(src: Path, dst: Path) -> None:
    """Copy a GeoJSON or GeoParquet polygon file into a GeoPackage with a spatial index, in batches."""
    import pyogrio

    if src.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        from pyproj import CRS

        pf = pq.ParquetFile(src)
        geo = json.loads((pf.schema_arrow.metadata or {}).get(b"geo", b"{}"))
        col = geo.get("primary_column", "geometry")
        crs_json = ((geo.get("columns") or {}).get(col) or {}).get("crs", "missing")
        # GeoParquet: a missing crs means OGC:CRS84; null means unknown
        crs = (
            "OGC:CRS84"
            if crs_json == "missing"
            else (None if crs_json is None else CRS.from_json_dict(crs_json).to_wkt())
        )
        first = True
        for batch in pf.iter_batches(batch_size=_COPY_BATCH):
            pyogrio.write_arrow(
                pa.Table.from_batches([batch]),
                dst,
                layer="polygons",
                driver="GPKG",
                geometry_name=col,
                geometry_type="Polygon",
                crs=crs,
                append=not first,
            )
            first = False
        if first:
            raise ValueError(f"{src.name} holds no polygons")
        return
    with pyogrio.raw.open_arrow(src, batch_size=_COPY_BATCH, use_pyarrow=True) as (meta, reader):
        pyogrio.write_arrow(
            reader,
            dst,
            layer="polygons",
            driver="GPKG",
            geometry_name=meta.get("geometry_name") or "wkb_geometry",
            geometry_type=meta.get("geometry_type") or "Polygon",
            crs=meta.get("crs"),
        )


class PolygonLayer:
    """The polygons of one scene, queried by view and by point.

    Args:
        path: a GeoPackage (used in place), GeoJSON or GeoParquet (copied on first use).

    Thread-safe: each query takes its own read-only SQLite connection from a small pool.
    """

    def __init__(self, path: str | Path) -> None:
        self.source = Path(path)
        self._lock = threading.Lock()
        self._ready = False
        self._tmpdir: str | None = None
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._conns: list[sqlite3.Connection] = []
        self._proj_lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, float], str] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()

    # -------------------------------------------------------------- opening
    def prepare(self) -> None:
        """Open the GeoPackage (copying a GeoJSON or GeoParquet file into one first); idempotent."""
        with self._lock:
            if self._ready:
                return
            if self.source.suffix.lower() == ".gpkg":
                self.gpkg = self.source
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="geovae-view-")
                self.gpkg = Path(self._tmpdir) / "polygons.gpkg"
                log.info("indexing %s for the viewer", self.source.name)
                _copy_to_gpkg(self.source, self.gpkg)
            self._read_layout()
            self._ready = True

    def _connect(self) -> sqlite3.Connection:
        uri = self.gpkg.resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._conns.append(conn)
        return conn

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        self.prepare()
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        finally:
            self._pool.put(conn)

    def _read_layout(self) -> None:
        from pyproj import CRS, Transformer

        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT c.table_name, g.column_name, g.srs_id FROM gpkg_contents c "
                "JOIN gpkg_geometry_columns g ON g.table_name = c.table_name WHERE c.data_type = 'features'"
            ).fetchall()
            if not rows:
                raise ValueError(f"{self.source.name} has no polygon layer")
            self.table, self.geom, srs_id = rows[0]
            rtree = f"rtree_{self.table}_{self.geom}"
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (rtree,)).fetchone():
                raise ValueError(
                    f"{self.source.name} has no spatial index; rewrite it with one (ogr2ogr -lco SPATIAL_INDEX=YES)"
                )
            self.rtree = rtree
            cols = conn.execute(f"PRAGMA table_info({_quote(self.table)})").fetchall()
            self.fid = next((c[1] for c in cols if c[5]), "fid")
            self.columns = [c[1] for c in cols if c[1] not in (self.fid, self.geom)]
            org, code, definition = conn.execute(
                "SELECT organization, organization_coordsys_id, definition FROM gpkg_spatial_ref_sys WHERE srs_id = ?",
                (srs_id,),
            ).fetchone() or (None, None, None)
            bounds = conn.execute(
                f"SELECT min(minx), min(miny), max(maxx), max(maxy) FROM {_quote(self.rtree)}"
            ).fetchone()
        finally:
            conn.close()
            self._conns.remove(conn)
        if definition and definition.strip().lower() not in ("undefined", ""):
            crs = CRS.from_user_input(definition)
        elif org and code and int(code) > 0:
            crs = CRS.from_authority(org, int(code))
        else:
            raise ValueError(f"{self.source.name} has no CRS: a map needs georeferenced polygons")
        self.crs = crs
        self.geographic = crs.is_geographic
        self.unit_metres = 1.0 if crs.is_geographic else float(crs.axis_info[0].unit_conversion_factor or 1.0)
        self._to_layer = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        self._to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        self.bounds = tuple(float(v) for v in bounds) if bounds[0] is not None else None
        self.mid_lat = 0.0
        if self.bounds is not None:
            _, lat = self._to_lonlat.transform(
                (self.bounds[0] + self.bounds[2]) / 2, (self.bounds[1] + self.bounds[3]) / 2
            )
            self.mid_lat = float(lat) if math.isfinite(lat) else 0.0
        log.debug("polygons %s: table %s, %d columns, CRS %s", self.source.name, self.table, len(self.columns), crs)

    def close(self) -> None:
        """Close the connections and remove the temporary copy, if one was made."""
        for c in self._conns:
            c.close()
        self._conns.clear()
        self._pool = queue.SimpleQueue()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self._ready = False

    # -------------------------------------------------------------- geometry helpers
    def _tolerance(self, zoom: float) -> float:
        """One screen pixel at this zoom in the layer's units (at the layer's middle latitude,
        so that one zoom has one tolerance and its features can be cached)."""
        m = metres_per_pixel(zoom, self.mid_lat)
        if self.geographic:
            return m / 111_320.0
        return m / self.unit_metres

    def _features(
        self,
        conn: sqlite3.Connection,
        ids: Sequence[int],
        tol: float,
        clip: tuple[float, float, float, float] | None = None,
    ) -> list[str]:
        """GeoJSON Feature strings (lon/lat outlines, simplified to ``tol``) of the given fids, in order.

        Features already made for the same tolerance (the same zoom) come from a cache, so a
        pan re-sends the big polygons still in view without simplifying them again. Outlines
        that reach beyond ``clip`` are cut to it and not cached (they depend on the view).
        """
        key = round(tol, 9)
        with self._cache_lock:
            cached = {fid: self._cache[(fid, key)] for fid in ids if (fid, key) in self._cache}
            for fid in cached:
                self._cache.move_to_end((fid, key))
        todo = [fid for fid in ids if fid not in cached]
        made = dict(zip(todo, self._make_features(conn, todo, tol, clip), strict=True)) if todo else {}
        with self._cache_lock:
            for fid, (text, whole) in made.items():
                if text is not None and whole and (fid, key) not in self._cache:
                    self._cache[(fid, key)] = text
                    self._cache_bytes += len(text)
            while self._cache_bytes > CACHE_BYTES and self._cache:
                self._cache_bytes -= len(self._cache.popitem(last=False)[1])
        out = []
        for fid in ids:
            text = cached[fid] if fid in cached else made[fid][0]
            if text is not None:
                out.append(text)
        return out

    def _make_features(
        self, conn: sqlite3.Connection, ids: Sequence[int], tol: float, clip: tuple[float, float, float, float] | None
    ) -> list[tuple[str | None, bool]]:
        """Per fid: its GeoJSON Feature string (None where the geometry is missing or vanishes)
        and whether it is whole (not cut to ``clip``)."""
        import shapely

        cols = ", ".join(_quote(c) for c in self.columns)
        by_fid: dict[int, tuple[Any, ...]] = {}
        for i in range(0, len(ids), _SQL_CHUNK):
            chunk = list(ids[i : i + _SQL_CHUNK])
            sql = (
                f"SELECT {_quote(self.fid)}, {_quote(self.geom)}{', ' + cols if cols else ''} "
                f"FROM {_quote(self.table)} WHERE {_quote(self.fid)} IN ({','.join('?' * len(chunk))})"
            )
            by_fid.update((r[0], r) for r in conn.execute(sql, chunk) if r[1] is not None)
        rows = [by_fid[fid] for fid in ids if fid in by_fid]
        if not rows:
            return [(None, True)] * len(ids)
        # The page draws outlines only, so the rings go as lines: Douglas-Peucker on a polygon
        # ends in a validity repair (an overlay) that makes it 15x slower per vertex than on its
        # rings (1.5 s against 0.1 s for a view of 1M pixel-exact vertices), and a line can be
        # cut to the view without drawing a false edge along the cut.
        lines = shapely.boundary(shapely.from_wkb([_wkb(r[1]) for r in rows]))
        cut = np.zeros(len(rows), bool)
        if clip is not None:
            b = shapely.bounds(lines)
            cut = (b[:, 0] < clip[0]) | (b[:, 1] < clip[1]) | (b[:, 2] > clip[2]) | (b[:, 3] > clip[3])
            if cut.any():
                lines[cut] = shapely.clip_by_rect(lines[cut], *clip)
        if tol > 0:
            lines = shapely.simplify(lines, tol, preserve_topology=False)
        with self._proj_lock:  # one Transformer, shared: PROJ objects are not for concurrent use
            lines = shapely.transform(lines, lambda xy: np.column_stack(self._to_lonlat.transform(xy[:, 0], xy[:, 1])))
        # 7 decimals are about 1 cm, as the GeoJSON output; halves the bytes sent
        lines = shapely.set_precision(lines, 1e-7, mode="pointwise")
        texts = shapely.to_geojson(lines)
        empty = shapely.is_empty(lines) | shapely.is_missing(lines)
        made: dict[int, tuple[str | None, bool]] = {}
        for r, text, gone, was_cut in zip(rows, texts, empty, cut, strict=True):
            if gone:
                made[r[0]] = (None, not was_cut)
                continue
            props = {
                c: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for c, v in zip(self.columns, r[2:], strict=True)
                if not isinstance(v, bytes)
            }
            made[r[0]] = (
                f'{{"type":"Feature","id":{int(r[0])},"geometry":{text},"properties":{json.dumps(props)}}}',
                not bool(was_cut),
            )
        return [made.get(fid, (None, True)) for fid in ids]

    def _view_in_layer(self, west: float, south: float, east: float, north: float) -> tuple[float, ...] | None:
        """The view's bounds in the layer's CRS, clipped to the layer; None when they miss it."""
        with self._proj_lock:
            b = self._to_layer.transform_bounds(west, south, east, north, densify_pts=21)
        if not all(math.isfinite(v) for v in b):
            return self.bounds
        if self.bounds is None:
            return None
        lb = self.bounds
        w, s, e, n = max(b[0], lb[0]), max(b[1], lb[1]), min(b[2], lb[2]), min(b[3], lb[3])
        return (w, s, e, n) if w <= e and s <= n else None

    # -------------------------------------------------------------- queries
    def in_view(
        self,
        west: float,
        south: float,
        east: float,
        north: float,
        zoom: float,
        limit: int = MAX_FEATURES,
        max_bytes: int = MAX_VIEW_BYTES,
    ) -> str:
        """The polygons in a view, as a GeoJSON FeatureCollection string.

        Args:
            west, south, east, north: the view in degrees.
            zoom: the map's zoom (sets the simplification and the smallest polygon drawn).
            limit: most polygons returned; the largest are kept.
            max_bytes: most geometry (WKB bytes, about 16 a vertex) read for the view: the
                largest polygons are taken until it is reached.

        Returns:
            A FeatureCollection with ``truncated`` (more were in view than sent) and ``tolerance``
            (the simplification, in the layer's units) members.
        """
        self.prepare()
        west, east = max(west, -180.0), min(east, 180.0)
        south, north = max(south, -85.06), min(north, 85.06)
        box = self._view_in_layer(west, south, east, north) if west < east and south < north else None
        if box is None:
            return '{"type":"FeatureCollection","features":[],"truncated":false}'
        tol = self._tolerance(zoom)
        smallest = MIN_PIXELS * tol
        # the largest boxes in view, with their geometry's size (read from the record header,
        # not the geometry itself)
        sql = (
            f"SELECT r.id, length(t.{_quote(self.geom)}) FROM (SELECT id, (maxx - minx) * (maxy - miny) AS a "
            f"FROM {_quote(self.rtree)} WHERE minx <= ? AND maxx >= ? AND miny <= ? AND maxy >= ? "
            "AND (maxx - minx >= ? OR maxy - miny >= ?) ORDER BY a DESC LIMIT ?) r "
            f"JOIN {_quote(self.table)} t ON t.{_quote(self.fid)} = r.id ORDER BY r.a DESC"
        )
        with self._conn() as conn:
            rows = conn.execute(sql, (box[2], box[0], box[3], box[1], smallest, smallest, limit + 1)).fetchall()
            ids: list[int] = []
            total = 0
            for fid, size in rows[:limit]:
                total += size or 0
                if total > max_bytes and ids:
                    break
                ids.append(fid)
            truncated = len(ids) < len(rows)
            # outlines are cut half a view beyond each side: a pan reloads them when it ends
            dx, dy = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
            feats = self._features(conn, ids, tol, (box[0] - dx, box[1] - dy, box[2] + dx, box[3] + dy))
        return '{{"type":"FeatureCollection","truncated":{},"tolerance":{},"features":[{}]}}'.format(
            "true" if truncated else "false",
            json.dumps(tol),
            ",".join(feats),
        )

    def at(self, lon: float, lat: float, zoom: float = 20) -> str | None:
        """The polygon under a point, as a GeoJSON Feature string, or None.

        Args:
            lon, lat: the point in degrees.
            zoom: the map's zoom, to simplify the returned outline for drawing.
        """
        import shapely

        self.prepare()
        with self._proj_lock:
            x, y = self._to_layer.transform(lon, lat)
        if not (math.isfinite(x) and math.isfinite(y)):
            return None
        sql = f"SELECT id FROM {_quote(self.rtree)} WHERE minx <= ? AND maxx >= ? AND miny <= ? AND maxy >= ?"
        cols = ", ".join(_quote(c) for c in [self.fid, self.geom])
        with self._conn() as conn:
            ids = [r[0] for r in conn.execute(sql, (x, x, y, y))]
            if not ids:
                return None
            rows = conn.execute(
                f"SELECT {cols} FROM {_quote(self.table)} WHERE {_quote(self.fid)} IN ({','.join('?' * len(ids))})", ids
            ).fetchall()
            rows = [r for r in rows if r[1] is not None]
            geoms = shapely.from_wkb([_wkb(r[1]) for r in rows])
            hit = shapely.intersects_xy(geoms, x, y)
            if not hit.any():
                return None
            # on a shared edge both neighbours match: the smaller one is the more specific answer
            best = min(np.flatnonzero(hit), key=lambda i: shapely.area(geoms[i]))
            feats = self._features(conn, [int(rows[best][0])], self._tolerance(zoom))
        return feats[0] if feats else None
