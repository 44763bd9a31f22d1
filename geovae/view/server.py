"""The viewer's HTTP server: the page, map tiles, polygons and the output files, read-only.

Standard library only (``http.server``): one thread per connection, HTTP/1.1 keep-alive, GET
and HEAD. Safe by default:

* only the page's own files, tiles and polygons of the catalog's layers (addressed by scene
  id and layer kind, never by path), and the output files the catalog lists are served; a
  request path with ``..`` or ``.`` segments, before or after percent-decoding, a backslash or
  a NUL is refused (403) before any routing;
* every other method gets 405: nothing is ever written;
* it listens on 127.0.0.1 unless a host is given, and then answers only requests whose
  ``Host`` header names this server (a web page elsewhere cannot reach it through DNS
  rebinding);
* the page may load nothing from outside (Content-Security-Policy), except a ``--basemap``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import mimetypes
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from geovae.heap import tune_heap
from geovae.view.catalog import RASTER_KINDS, Catalog, SceneEntry
from geovae.view.polygons import PolygonLayer
from geovae.view.tiles import TileRenderer

log = logging.getLogger(__name__)

__all__ = ["ViewServer", "is_traversal"]

STATIC = Path(__file__).with_name("static")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_TILE = re.compile(r"^/tiles/(s\d+)/([a-z_]+)/(\d{1,2})/(\d{1,8})/(\d{1,8})\.png$")
_API = re.compile(r"^/api/(s\d+)/(scene|polygons|at)$")


def is_traversal(raw_path: str) -> bool:
    """Whether a request path tries to leave its folder (``..``/``.`` segments, encoded or not).

    Decodes up to three times, so ``%2e%2e%2f`` and ``%252e%252e%252f`` are caught as well as
    ``/../``; a backslash or NUL anywhere is refused too (Windows separators, C string ends).
    """
    p = raw_path
    for _ in range(3):
        if "\\" in p or "\x00" in p:
            return True
        if any(seg in ("..", ".") for seg in p.split("/")):
            return True
        q = unquote(p)
        if q == p:
            break
        p = q
    return "\\" in p or "\x00" in p or any(seg in ("..", ".") for seg in p.split("/"))


def _leaflet_dir() -> Path:
    import xstatic.pkg.leaflet as leaflet

    return Path(leaflet.BASE_DIR)


def _files_under(folder: Path) -> dict[str, Path]:
    """Files under ``folder`` (recursively) by their relative POSIX path."""
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


class ViewServer(ThreadingHTTPServer):
    """A threaded HTTP server bound to one catalog.

    Args:
        catalog: what to show.
        host: address to listen on.
        port: port, 0 for a free one.
        basemap: an XYZ tile URL template drawn under the layers, or None.
        any_host: accept any ``Host`` header (the server listens beyond loopback, where
            clients name it by whatever address reaches it); else only loopback names.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        catalog: Catalog,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        basemap: str | None = None,
        any_host: bool = False,
    ) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.catalog = catalog
        self.basemap = basemap
        self.any_host = any_host
        self.entries = {e.id: e for e in catalog.scenes}
        # Each request thread reads and frees overview windows of a few MiB; with glibc's
        # rising threshold they pile up on the threads' heaps (RSS +100-150 MiB over 250 tiles
        # of a 20k² output, +5 MiB with the threshold fixed: test_view's bounded-memory test).
        tune_heap()
        self.tiles = TileRenderer(self.entries)
        self.polygons: dict[str, PolygonLayer] = {}
        self._poly_lock = threading.Lock()
        self.static = _files_under(STATIC)
        leaflet = _leaflet_dir()
        self.leaflet = {
            k: v
            for k, v in _files_under(leaflet).items()
            if k in ("leaflet.js", "leaflet.css") or (k.startswith("images/") and k.endswith(".png"))
        }
        # the output files the page may link to: the catalog's, plus the batch's own files
        self.files: dict[str, Path] = {}
        for e in catalog.scenes:
            for rel in e.files.values():
                self.files[rel] = catalog.root / rel
        for name in ("manifest.csv",):
            if (catalog.root / name).is_file():
                self.files[name] = catalog.root / name
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def allowed_host(self, header: str | None) -> bool:
        """DNS-rebinding guard: the Host header must name this server on loopback."""
        if self.any_host:
            return True
        if not header:
            return False
        m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:]+)(?::(\d+))?", header.strip())
        if not m:
            return False
        name = m.group(1).strip("[]").lower()
        return name in LOOPBACK and (m.group(2) is None or int(m.group(2)) == self.port)

    def polygon_layer(self, entry: SceneEntry) -> PolygonLayer | None:
        if entry.polygons is None:
            return None
        with self._poly_lock:
            if entry.id not in self.polygons:
                self.polygons[entry.id] = PolygonLayer(entry.polygons)
            return self.polygons[entry.id]

    def warm_up(self) -> None:
        """Work out the first scene's layer styles (percentiles, RGB bands) before the page asks.

        The RGB layer reads a decimated view of the scene and imports the quicklook's band
        choice (which loads torch): seconds that would otherwise delay its first tiles. A
        GeoJSON-only output's polygons are copied into an indexed GeoPackage (about a minute
        for 430k polygons), so that starts here too.
        """
        first = next((e for e in self.catalog.scenes if e.bounds), None)
        if first is None:
            return
        # the RGB layer first: it is the slow one, and the page asks for the rest at once anyway
        for kind in ["scene", *RASTER_KINDS]:
            self.tiles.style(first.id, kind)
        layer = self.polygon_layer(first)
        if layer is not None:  # a GeoJSON output is copied into an indexed GeoPackage: start now
            try:
                layer.prepare()
            except Exception as e:  # the polygon request will say what is wrong
                log.warning("polygons of %s cannot be shown: %s", first.name, e)

    def server_close(self) -> None:
        super().server_close()
        for layer in self.polygons.values():
            layer.close()

    # ------------------------------------------------------------------ JSON documents
    def catalog_json(self) -> dict[str, Any]:
        cat = self.catalog
        return {
            "title": cat.root.name,
            "kind": cat.kind,
            "basemap": self.basemap,
            "manifest": "files/manifest.csv" if "manifest.csv" in self.files else None,
            "scenes": [
                {
                    "id": e.id,
                    "name": e.name,
                    "status": e.status,
                    "error": e.error,
                    "bounds": list(e.bounds) if e.bounds else None,
                }
                for e in cat.scenes
            ],
        }

    def scene_json(self, entry: SceneEntry) -> dict[str, Any]:
        layers = []
        if entry.scene and entry.bounds:
            # The RGB layer's style takes seconds the first time (see warm_up); until it is
            # ready the page shows the other layers and asks again, rather than letting its
            # tile requests hold every connection the browser allows to this server.
            if not self.tiles.ready(entry.id, "scene"):
                self.tiles.prepare_in_background(entry.id, "scene")
                layers.append({"kind": "scene", "title": "Scene (RGB)", "pending": True})
            elif self.tiles.style(entry.id, "scene") is not None:  # None: the scene cannot be read
                layers.append({"kind": "scene", "title": "Scene (RGB)", "pending": False})
        for kind, title in RASTER_KINDS.items():
            if kind in entry.rasters and entry.bounds:
                layer: dict[str, Any] = {"kind": kind, "title": title}
                style = self.tiles.style(entry.id, kind)
                if style is None:
                    continue
                layer.update(style.legend())
                layers.append(layer)
        return {
            "id": entry.id,
            "name": entry.name,
            "status": entry.status,
            "error": entry.error,
            "bounds": list(entry.bounds) if entry.bounds else None,
            "layers": layers,
            "polygons": entry.polygons is not None and entry.bounds is not None,
            "classes": [{**c, "color": "#{:02x}{:02x}{:02x}".format(*tuple(c["color"]))} for c in entry.classes],
            "area_unit": entry.area_unit,
            "files": {k: f"files/{v}" for k, v in entry.files.items()},
        }


class _Handler(BaseHTTPRequestHandler):
    server: ViewServer
    protocol_version = "HTTP/1.1"
    server_version = "geovae-view"
    # headers and body are two writes: with Nagle on, a keep-alive client waits for its delayed
    # ACK (40 ms) before the body arrives
    disable_nagle_algorithm = True
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ responses
    def _security_headers(self) -> None:
        img = "'self' data: blob:"
        if self.server.basemap:
            parts = urlsplit(self.server.basemap.replace("{s}", "a"))
            if parts.scheme in ("http", "https") and parts.netloc:
                # a template's {s} subdomains: allow the whole host family
                host = re.sub(r"^\{s\}\.", "*.", urlsplit(self.server.basemap).netloc)
                img += f" {parts.scheme}://{host}"
        self.send_header(
            "Content-Security-Policy",
            f"default-src 'self'; img-src {img}; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'",
        )
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")

    def _send(
        self, status: int, body: bytes, ctype: str, *, cache: str = "no-cache", extra: dict[str, str] | None = None
    ) -> None:
        if (
            ctype.startswith(("application/json", "text/", "application/javascript", "application/geo+json"))
            and len(body) > 1024
            and "gzip" in (self.headers.get("Accept-Encoding") or "")
        ):
            # level 1: 3x faster than 5 (40 against 116 ms for a 3.7 MB view), 13 % larger
            body = gzip.compress(body, compresslevel=1)
            extra = {**(extra or {}), "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self._security_headers()
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str = "") -> None:
        body = json.dumps({"error": message or status.phrase}).encode()
        self._send(status, body, "application/json")

    def _json(self, obj: Any) -> None:
        self._send(200, json.dumps(obj).encode(), "application/json")

    def _file(self, path: Path, *, cache: str = "no-cache") -> None:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix == ".js":
            ctype = "application/javascript"
        if ctype.startswith("text/") or ctype == "application/javascript" or ctype == "application/json":
            ctype += "; charset=utf-8"
        self._send(200, path.read_bytes(), ctype, cache=cache)

    # ------------------------------------------------------------------ methods
    def do_GET(self) -> None:
        t0 = time.perf_counter()
        try:
            self._route()
            log.debug("%s %.1f ms", self.path, 1000 * (time.perf_counter() - t0))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug or an unreadable file: say so, keep serving
            log.warning("%s failed: %s: %s", self.path, type(e).__name__, e)
            with contextlib.suppress(OSError):
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _read_only(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _read_only

    # ------------------------------------------------------------------ routing
    def _route(self) -> None:
        srv = self.server
        if not srv.allowed_host(self.headers.get("Host")):
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header (the viewer answers on loopback only)")
        target = self.path
        if "://" in target.split("?", 1)[0]:  # absolute-form request target
            target = urlsplit(target)._replace(scheme="", netloc="").geturl()
        raw_path, _, query = target.partition("?")
        if is_traversal(raw_path):
            return self._error(HTTPStatus.FORBIDDEN, "path outside the served folder")
        path = unquote(raw_path)
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if path == "/favicon.ico":  # browsers ask for it; the page has none
            return self._send(204, b"", "image/x-icon", cache="max-age=86400")
        if path in ("/", "/index.html"):
            return self._file(STATIC / "index.html")
        if path.startswith("/static/") and path[8:] in srv.static:
            return self._file(srv.static[path[8:]])
        if path.startswith("/leaflet/") and path[9:] in srv.leaflet:
            return self._file(srv.leaflet[path[9:]], cache="max-age=86400")
        if path == "/api/catalog":
            return self._json(srv.catalog_json())
        if path.startswith("/files/"):
            rel = path[7:]
            f = srv.files.get(rel)
            if f is None or not f.is_file():
                return self._error(HTTPStatus.NOT_FOUND, "no such output file")
            try:  # the file may have been replaced by a link since the catalog was read
                f.resolve().relative_to(srv.catalog.root)
            except ValueError:
                return self._error(HTTPStatus.FORBIDDEN, "path outside the served folder")
            return self._file(f)
        m = _TILE.match(path)
        if m:
            sid, kind, z, x, y = m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), int(m.group(5))
            png = srv.tiles.tile(sid, kind, z, x, y)
            if png is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such layer")
            return self._send(200, png, "image/png", cache="max-age=60")
        m = _API.match(path)
        if m:
            entry = srv.entries.get(m.group(1))
            if entry is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such scene")
            if m.group(2) == "scene":
                return self._json(srv.scene_json(entry))
            layer = srv.polygon_layer(entry)
            if layer is None:
                return self._error(HTTPStatus.NOT_FOUND, "this scene has no polygons")
            try:
                zoom = float(params.get("z", "20"))
                if m.group(2) == "polygons":
                    w, s, e, n = (float(v) for v in params["bbox"].split(","))
                else:
                    lon, lat = float(params["lon"]), float(params["lat"])
            except (KeyError, ValueError) as exc:
                return self._error(HTTPStatus.BAD_REQUEST, f"bad query: {type(exc).__name__} {exc}")
            if m.group(2) == "polygons":
                body = layer.in_view(w, s, e, n, zoom)
            else:
                body = layer.at(lon, lat, zoom) or "null"
            return self._send(200, body.encode(), "application/geo+json")
        return self._error(HTTPStatus.NOT_FOUND)
