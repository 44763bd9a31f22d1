"""STAC in: a search (loopback STAC API, GET and POST, paged), Items' band assets stacked from
COGs served over HTTP range requests, clipped to an area, segmented by `batch` on a cluster.

Two servers run on 127.0.0.1 inside the tests: a small STAC API (core, item search with the
query extension, ``next`` links) and a file server that honours ``Range`` and gives ``ETag``
and ``Last-Modified``. The COGs are bands of the real NC Landsat-7 scene (``nc_stack``),
one band per file as Sentinel-2 and Landsat are published.
"""

from __future__ import annotations

import email.utils
import http.server
import json
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely.geometry
from rasterio.windows import Window

from geovae.errors import AreaOutsideSceneError, OptionError, SceneError, SourceError
from geovae.scene import open_scene
from geovae.sources import Search, find_items, item_source, item_sources, parse_query, read_items, stack_rasters
from geovae.sources.remote import remote_identity

#: NC scene bands as single-band assets, named as Earth Search names them.
BANDS = {"red": 3, "green": 2, "blue": 1, "nir": 4}
ASSETS = ["red", "green", "blue", "nir"]
#: Small tiles keep the tiny model quick on 2 shared cores; the toy model is forced past the
#: trust check (its statistics are the scene's, but it is untrained).
SEG = {"tile": 64, "overlap": 16, "batch_size": 4, "device": "cpu", "block_size": 128, "force": True}
PAGE = 2  # items per page: every search here spans several pages


# --------------------------------------------------------------------------- the servers
class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    items: list[dict[str, Any]]
    log: list[tuple[str, str, str]]
    served: dict[str, int]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (GDAL's timeout) breaks the pipe: expected here


def _interval(text: str) -> tuple[datetime | None, datetime | None]:
    def one(p: str) -> datetime | None:
        return None if p in ("", "..") else datetime.fromisoformat(p)

    a, _, b = text.partition("/")
    return (one(a), one(b)) if b or "/" in text else (one(a), one(a))


def _keep(item: dict[str, Any], params: dict[str, Any]) -> bool:
    """The API's item filter: collections, bbox/intersects, datetime, query."""
    if params.get("collections") and item["collection"] not in params["collections"]:
        return False
    geom = shapely.geometry.shape(item["geometry"])
    if params.get("bbox") and not geom.intersects(shapely.geometry.box(*params["bbox"])):
        return False
    if params.get("intersects") and not geom.intersects(shapely.geometry.shape(params["intersects"])):
        return False
    if params.get("datetime"):
        a, b = _interval(params["datetime"])
        t = datetime.fromisoformat(item["properties"]["datetime"])
        if (a and t < a) or (b and t > b):
            return False
    ops = {"lt": np.less, "lte": np.less_equal, "gt": np.greater, "gte": np.greater_equal, "eq": np.equal}
    for prop, conds in (params.get("query") or {}).items():
        for op, ref in conds.items():
            v = item["properties"].get(prop)
            if v is None or not ops[op](v, ref):
                return False
    return True


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _json(self, doc: Any, status: int = 200) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._file(head=True)

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        self.server.log.append(("GET", url.path, self.headers.get("Range", "")))
        if url.path.startswith(("/files/", "/slow/")):
            return self._file(head=False)
        q = urllib.parse.parse_qs(url.query)
        if url.path in ("", "/"):
            return self._json(self._landing())
        if url.path == "/conformance":
            return self._json({"conformsTo": self._landing()["conformsTo"]})
        if url.path == "/search":
            params: dict[str, Any] = {}
            if "collections" in q:
                params["collections"] = q["collections"][0].split(",")
            if "bbox" in q:
                params["bbox"] = [float(v) for v in q["bbox"][0].split(",")]
            for key in ("intersects", "query"):
                if key in q:
                    params[key] = json.loads(q[key][0])
            if "datetime" in q:
                params["datetime"] = q["datetime"][0]
            page = int(q.get("token", ["0"])[0])
            return self._search(params, page, "GET", q)
        parts = url.path.strip("/").split("/")
        if len(parts) == 4 and parts[0] == "collections" and parts[2] == "items":
            for it in self.server.items:
                if it["collection"] == parts[1] and it["id"] == parts[3]:
                    return self._json(it)
        self._json({"code": "NotFound", "description": url.path}, 404)

    def do_POST(self) -> None:
        url = urllib.parse.urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.server.log.append(("POST", url.path, ""))
        if url.path != "/search":
            return self._json({"code": "NotFound"}, 404)
        self._search(body, int(body.get("token", 0)), "POST", body)

    def _landing(self) -> dict[str, Any]:
        return {
            "type": "Catalog",
            "id": "loopback",
            "stac_version": "1.0.0",
            "description": "a STAC API on 127.0.0.1 for the tests",
            "conformsTo": [
                "https://api.stacspec.org/v1.0.0/core",
                "https://api.stacspec.org/v1.0.0/item-search",
                "https://api.stacspec.org/v1.0.0/item-search#query",
            ],
            "links": [
                {"rel": "self", "href": f"{self.base}/", "type": "application/json"},
                {"rel": "root", "href": f"{self.base}/", "type": "application/json"},
                {"rel": "conformance", "href": f"{self.base}/conformance", "type": "application/json"},
                {"rel": "search", "href": f"{self.base}/search", "type": "application/geo+json", "method": "GET"},
                {"rel": "search", "href": f"{self.base}/search", "type": "application/geo+json", "method": "POST"},
            ],
        }

    def _search(self, params: dict[str, Any], page: int, method: str, raw: Any) -> None:
        found = [it for it in self.server.items if _keep(it, params)]
        limit = min(int(params.get("limit") or PAGE), PAGE)
        chunk = found[page * limit : (page + 1) * limit]
        links = []
        if (page + 1) * limit < len(found):
            if method == "GET":
                q = {k: v[0] for k, v in raw.items()} | {"token": str(page + 1)}
                links.append({"rel": "next", "href": f"{self.base}/search?{urllib.parse.urlencode(q)}"})
            else:
                links.append(
                    {
                        "rel": "next",
                        "href": f"{self.base}/search",
                        "method": "POST",
                        "body": {**raw, "token": page + 1},
                        "merge": False,
                    }
                )
        self._json({"type": "FeatureCollection", "features": chunk, "links": links, "numberReturned": len(chunk)})

    def _file(self, head: bool) -> None:
        url = urllib.parse.urlparse(self.path)
        if head:
            self.server.log.append(("HEAD", url.path, ""))
        path = self.server.root / url.path.lstrip("/")
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if url.path.startswith("/slow/"):
            time.sleep(3)  # past the tests' GDAL_HTTP_TIMEOUT
        st = path.stat()
        size = st.st_size
        rng = self.headers.get("Range")
        start, end = 0, size - 1
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) if b else size - 1, size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{size:x}-{st.st_mtime_ns:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        self.end_headers()
        if not head:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start + 1)
            self.server.served[url.path] = self.server.served.get(url.path, 0) + len(data)
            self.wfile.write(data)


# ---------------------------------------------------------------------------- the data
def _write_cog(path: Path, data: np.ndarray, profile: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prof = {k: profile[k] for k in ("crs", "transform", "nodata")} | {
        "driver": "COG",
        "dtype": str(data.dtype),
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "blocksize": 128,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    return path


def _footprint(profile: dict[str, Any]) -> dict[str, Any]:
    from rasterio.warp import transform_geom

    t, w, h = profile["transform"], profile["width"], profile["height"]
    x0, y0 = t @ (0, 0)
    x1, y1 = t @ (w, h)
    ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    return dict(transform_geom(profile["crs"], "EPSG:4326", {"type": "Polygon", "coordinates": [ring]}))


def _item(base: str, item_id: str, folder: str, profile: dict[str, Any], when: str, cloud: float, **assets: str) -> Any:
    geom = _footprint(profile)
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
        "id": item_id,
        "collection": "nc-landsat",
        "geometry": geom,
        "bbox": list(shapely.geometry.shape(geom).bounds),
        "properties": {"datetime": when, "eo:cloud_cover": cloud, "platform": "landsat-7"},
        "links": [{"rel": "self", "href": f"{base}/collections/nc-landsat/items/{item_id}"}],
        "assets": {
            key: {
                "href": f"{base}/{assets.get(key, f'{folder}/{key}.tif')}",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "eo:bands": [{"name": key, "common_name": key}],
            }
            for key in ASSETS
        }
        | {"thumbnail": {"href": f"{base}/files/thumb.png", "type": "image/png", "roles": ["thumbnail"]}},
    }


@pytest.fixture(scope="module")
def stac(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The servers, the Items and a local 4-band file of the same bands (the reference)."""
    from conftest import data_path

    nc_stack = data_path("nc_landsat7_landclass96", "nc_lsat7_2000_6band_uint8.tif")
    root = tmp_path_factory.mktemp("served")
    with rasterio.open(nc_stack) as src:
        profile = dict(src.profile)
        bands = {k: src.read(b)[None] for k, b in BANDS.items()}
    local = root.parent / "local_rgbn.tif"
    # MINISBLACK: four 8-bit bands would otherwise be written as RGB + alpha
    with rasterio.open(local, "w", **(profile | {"count": 4, "photometric": "MINISBLACK"})) as dst:
        dst.write(np.concatenate([bands[k] for k in ASSETS]))
        dst.descriptions = tuple(ASSETS)
    for folder in ("nc-a", "nc-b", "nc-c", "nc-e"):
        for k in ASSETS:
            _write_cog(root / "files" / folder / f"{k}.tif", bands[k], profile)
    # nc-d: only the scene's eastern third is served, under a footprint that claims it all
    east = Window(330, 0, profile["width"] - 330, profile["height"])
    east_profile = profile | {
        "width": int(east.width),
        "transform": rasterio.windows.transform(east, profile["transform"]),
    }
    for k in ASSETS:
        _write_cog(root / "files" / "nc-d" / f"{k}.tif", bands[k][:, :, 330:], east_profile)
    (root / "files" / "nc-e" / "nir.tif").unlink()  # its nir asset answers 404
    server = _Server(("127.0.0.1", 0), _Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    server.root, server.log, server.served = root, [], {}
    server.items = [
        _item(base, "nc-a", "files/nc-a", profile, "2000-05-24T15:40:00+00:00", 5.0),
        _item(base, "nc-b", "files/nc-b", profile, "2000-06-25T15:40:00+00:00", 12.0),
        _item(base, "nc-c", "files/nc-c", profile, "2000-07-27T15:40:00+00:00", 18.0),
        _item(base, "nc-d", "files/nc-d", profile, "2000-08-12T15:40:00+00:00", 3.0),
        _item(base, "nc-e", "files/nc-e", profile, "2000-08-28T15:40:00+00:00", 9.0),
        # cloudy, and another year: left out by the searches below
        _item(base, "nc-cloudy", "files/nc-a", profile, "2000-06-09T15:40:00+00:00", 80.0),
        _item(base, "nc-1999", "files/nc-a", profile, "1999-06-09T15:40:00+00:00", 1.0),
    ]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # GDAL reads the COGs over /vsicurl/ from 127.0.0.1 (no proxy), without listing folders, fails
    # fast on a stalled server, and does not cache a served file (the tests rewrite one).
    env = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GDAL_HTTP_TIMEOUT": "2",
        "GDAL_HTTP_MAX_RETRY": "0",
        "CPL_VSIL_CURL_NON_CACHED": f"/vsicurl/{base}/",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {
            "base": base,
            "server": server,
            "root": root,
            "local": local,
            "profile": profile,
            "area": _west_area(profile),
        }
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.shutdown()
        server.server_close()


def _west_area(profile: dict[str, Any]) -> list[float]:
    """A bbox (WGS84) around columns 40-200, rows 60-260 of the scene: west of nc-d's data."""
    from rasterio.warp import transform_bounds

    t = profile["transform"]
    x0, y0 = t @ (40, 260)
    x1, y1 = t @ (200, 60)
    return [round(v, 6) for v in transform_bounds(profile["crs"], "EPSG:4326", x0, y0, x1, y1)]


def _search(stac: dict[str, Any], **kw: Any) -> Search:
    return Search(
        source=stac["base"],
        collections=("nc-landsat",),
        bbox=tuple(stac["area"]),
        datetime="2000-01-01/2000-12-31",
        query=parse_query(["eo:cloud_cover<20"]),
        **kw,
    )


# ----------------------------------------------------------------------------- search
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_search_follows_next_links(stac: dict[str, Any], method: str) -> None:
    log = stac["server"].log
    log.clear()
    items = find_items(_search(stac, method=method))
    assert [it["id"] for it in items] == ["nc-a", "nc-b", "nc-c", "nc-d", "nc-e"]
    searches = [e for e in log if e[1] == "/search"]
    assert len(searches) == 3  # 5 items, 2 a page
    assert {e[0] for e in searches} == {method}


def test_max_items_stops_the_search(stac: dict[str, Any]) -> None:
    assert [it["id"] for it in find_items(_search(stac, max_items=3))] == ["nc-a", "nc-b", "nc-c"]


def test_search_errors_are_one_line(stac: dict[str, Any]) -> None:
    with pytest.raises(SourceError, match="matched no items") as ei:
        find_items(Search(source=stac["base"], collections=("sentinel-2-l2a",)))
    assert "\n" not in str(ei.value)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # released: nothing listens there
    with pytest.raises(SourceError, match="cannot reach the STAC API") as ei:
        find_items(Search(source=f"http://127.0.0.1:{port}/"))
    assert "\n" not in str(ei.value)


def test_stac_geoparquet_gives_the_same_items(stac: dict[str, Any], tmp_path: Path) -> None:
    """An export of the catalogue as stac-geoparquet, filtered here, finds what the API finds."""
    from stac_geoparquet.arrow import parse_stac_items_to_arrow, to_parquet

    path = tmp_path / "items.parquet"
    to_parquet(parse_stac_items_to_arrow(stac["server"].items), path)
    search = Search(
        source=str(path),
        collections=("nc-landsat",),
        bbox=tuple(stac["area"]),
        datetime="2000-01-01/2000-12-31",
        query=parse_query(["eo:cloud_cover<20"]),
    )
    got = find_items(search)
    assert [it["id"] for it in got] == [it["id"] for it in find_items(_search(stac))]
    assert got[0]["assets"]["red"]["href"] == stac["server"].items[0]["assets"]["red"]["href"]


def test_query_values_are_numbers() -> None:
    assert parse_query(["eo:cloud_cover<20", "eo:cloud_cover>=2.5", "platform=landsat-7"]) == {
        "eo:cloud_cover": {"lt": 20, "gte": 2.5},
        "platform": {"eq": "landsat-7"},
    }
    with pytest.raises(OptionError, match="--query"):
        parse_query(["cloudy"])


# ------------------------------------------------------------------------ stacked assets
def test_item_assets_stack_into_the_local_scene(stac: dict[str, Any]) -> None:
    item = stac["server"].items[0]
    scene = open_scene(item_source(item, ASSETS))
    local = open_scene(stac["local"])
    assert (scene.crs, scene.transform, scene.shape) == (local.crs, local.transform, local.shape)
    assert scene.descriptions == ASSETS
    assert scene.stem == "nc-a" and scene.name == item["links"][0]["href"]
    full = Window(0, 0, local.width, local.height)
    a, va = scene.read(full)
    b, vb = local.read(full)
    assert np.array_equal(a, b)
    assert np.array_equal(va, vb)


def test_a_window_reads_only_its_blocks(stac: dict[str, Any]) -> None:
    """Only the header and the blocks under a window travel (HTTP range requests)."""
    server = stac["server"]
    scene = open_scene(item_source(server.items[1], ASSETS))  # nc-b: not read by other tests yet
    server.served.clear()
    server.log.clear()
    scene.read(Window(300, 300, 64, 64))
    sizes = {f"/files/nc-b/{k}.tif": (stac["root"] / "files" / "nc-b" / f"{k}.tif").stat().st_size for k in ASSETS}
    assert set(server.served) == set(sizes)
    assert all(e[2].startswith("bytes=") for e in server.log if e[1] in sizes and e[0] == "GET")
    assert sum(server.served.values()) < 0.6 * sum(sizes.values())


def test_other_resolution_and_crs_meet_on_the_first_grid(stac: dict[str, Any], tmp_path: Path) -> None:
    """A coarser band is resampled onto the finest grid; a band in another CRS is warped."""
    from rasterio.vrt import WarpedVRT

    prof = stac["profile"]
    with rasterio.open(stac["local"]) as src:
        red = src.read(1)
        # a 57 m band: every other pixel of nir, over the scene's even part (442 x 488)
        coarse = src.read(4)[0:442:2, 0:488:2]
        with WarpedVRT(src, crs="EPSG:32617") as v:
            utm = v.read(2)
            utm_profile = {"crs": v.crs, "transform": v.transform, "nodata": 0}
    coarse_t = prof["transform"] * rasterio.Affine.scale(2)
    a = _write_cog(tmp_path / "red.tif", red[None], prof)
    b = _write_cog(tmp_path / "nir57.tif", coarse[None], prof | {"transform": coarse_t})
    c = _write_cog(tmp_path / "green_utm.tif", utm[None], utm_profile)
    scene = open_scene(stack_rasters([str(a), str(b), str(c)]))
    assert (scene.crs, scene.transform, scene.shape) == (src.crs, src.transform, (src.height, src.width))
    d, _ = scene.read(Window(0, 0, scene.width, scene.height))
    assert np.array_equal(d[0], red)
    # every 57 m pixel covers 2x2 of the 28.5 m grid
    for dr in (0, 1):  # nearest neighbour: each 57 m pixel fills its 2 x 2 pixels of the 28.5 m grid
        for dc in (0, 1):
            assert np.array_equal(d[1][dr:442:2, dc:488:2], coarse.astype(np.float32))
    with rasterio.open(stac["local"]) as src:
        green = src.read(2)
    inside = (green > 0) & (d[2] > 0)
    assert inside.mean() > 0.8
    assert (d[2][inside] == green[inside]).mean() > 0.95  # nearest neighbour, twice reprojected


def test_area_clips_the_scene(stac: dict[str, Any]) -> None:
    from shapely.geometry import box, mapping

    item = stac["server"].items[0]
    area = mapping(box(*stac["area"]))
    src = item_source(item, ASSETS, area=area)
    scene = open_scene(src)
    c0, r0, w, h = src.provenance()["window"]
    assert (scene.width, scene.height) == (w, h) and w < 200 and h < 240
    assert c0 <= 40 and r0 <= 60 and c0 + w >= 200 and r0 + h >= 260  # covers the area
    local = open_scene(stac["local"])
    a, _ = scene.read(Window(0, 0, w, h))
    b, _ = local.read(Window(c0, r0, w, h))
    assert np.array_equal(a, b)
    assert scene.transform == local.transform * rasterio.Affine.translation(c0, r0)
    # nc-d's data lie east of the area: nothing to segment, which is no failure
    with pytest.raises(AreaOutsideSceneError, match="outside"):
        open_scene(item_source(stac["server"].items[3], ASSETS, area=area))


def test_asset_errors_are_one_line(stac: dict[str, Any]) -> None:
    items = stac["server"].items
    with pytest.raises(OptionError, match="no item has an asset 'B04'") as ei:
        item_sources(items, ["B04", "red"])
    assert "blue, green, nir, red, thumbnail" in str(ei.value)
    # one Item without the asset fails alone, with its keys
    lacking = json.loads(json.dumps(items[0]))
    del lacking["assets"]["nir"]
    with pytest.raises(SceneError, match="has no asset nir; its assets are blue, green, red, thumbnail"):
        open_scene(item_source(lacking, ASSETS))
    with pytest.raises(SceneError, match="404") as ei:
        open_scene(item_source(items[4], ASSETS))  # nc-e: nir answers 404
    assert "asset nir" in str(ei.value) and "\n" not in str(ei.value)
    slow = json.loads(json.dumps(items[0]))
    slow["assets"]["nir"]["href"] = slow["assets"]["nir"]["href"].replace("/files/", "/slow/")
    shutil.copytree(stac["root"] / "files" / "nc-a", stac["root"] / "slow" / "nc-a", dirs_exist_ok=True)
    with pytest.raises(SceneError, match="asset nir") as ei:
        open_scene(item_source(slow, ASSETS))
    assert "timed out" in str(ei.value).lower() or "timeout" in str(ei.value).lower()
    far = json.loads(json.dumps(items[0]))
    far["assets"]["nir"]["href"] = items[3]["assets"]["nir"]["href"]
    with pytest.raises(SceneError, match="overlap"):
        open_scene(item_source(far, ASSETS, area=shapely.geometry.mapping(shapely.geometry.box(*stac["area"]))))


def test_remote_fingerprint_follows_the_served_file(stac: dict[str, Any]) -> None:
    from geovae.batch.manifest import scene_fingerprint

    url = f"{stac['base']}/files/nc-c/red.tif"
    path = stac["root"] / "files" / "nc-c" / "red.tif"
    first = remote_identity(url)
    assert first["size"] == path.stat().st_size and first["etag"] and first["last_modified"]
    src = item_source(stac["server"].items[2], ASSETS)
    fp = scene_fingerprint(src)
    assert remote_identity(url) == first  # the same file, the same identity
    data = path.read_bytes()
    time.sleep(0.01)
    path.write_bytes(data)  # same bytes, new modification time: a new ETag
    assert remote_identity(url)["etag"] != first["etag"]
    assert scene_fingerprint(src) != fp
    gone = remote_identity(f"{stac['base']}/files/nc-c/none.tif")
    assert "404" in gone["unverified"]


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_rgbn(stac: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-band VAE segmenter file (random, fixed weights), normalised for the scene."""
    import torch

    from geovae.model.base import ModelInfo
    from geovae.model.io import save_model
    from geovae.model.vae import VAESegmenter

    sc = open_scene(stac["local"])
    d, v = sc.read(Window(0, 0, sc.width, sc.height))
    torch.manual_seed(0)
    module = VAESegmenter(4, 3, base_channels=4, depth=2, latent_channels=2).eval()
    info = ModelInfo(
        in_channels=4,
        num_classes=3,
        mean=d[:, v].mean(1).tolist(),
        std=d[:, v].std(1).tolist(),
        tile_size=64,
        class_names=["a", "b", "c"],
    )
    return save_model(tmp_path_factory.mktemp("model") / "rgbn.safetensors", module, info)


def _classes(path: Path) -> tuple[np.ndarray, Any, Any]:
    with rasterio.open(path) as ds:
        return ds.read(1), ds.transform, ds.crs


def _local_classes(stac: dict[str, Any], model: Path, window: list[int], out: Path) -> Path:
    """The classes of the same bands segmented from a local file cut to ``window``."""
    from geovae.segment import segment_scene

    c0, r0, w, h = window
    cut = out.parent / f"{out.name}-cut.tif"
    with rasterio.open(stac["local"]) as src:
        win = Window(c0, r0, w, h)
        prof = src.profile | {
            "width": w,
            "height": h,
            "transform": src.window_transform(win),
            "photometric": "MINISBLACK",
        }
        with rasterio.open(cut, "w", **prof) as dst:
            dst.write(src.read(window=win))
    res = segment_scene(cut, model, out, progress=False, **SEG)
    return res.outputs["classes"]


def test_search_batch_equals_local_and_resumes(
    stac: dict[str, Any], tiny_rgbn: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from geovae.batch import read_manifest
    from geovae.cli import main

    out = tmp_path / "out"
    w, s, e, n = stac["area"]
    args = [
        "batch",
        "--stac",
        stac["base"],
        "--collections",
        "nc-landsat",
        "--bbox",
        f"{w},{s},{e},{n}",
        "--datetime",
        "2000-01-01/2000-12-31",
        "--query",
        "eo:cloud_cover<20",
        "--assets",
        ",".join(ASSETS),
        "-m",
        str(tiny_rgbn),
        "-o",
        str(out),
        "--workers",
        "1",
        "-q",
        *[f"--{k.replace('_', '-')}={v}" for k, v in SEG.items() if k != "force"],
        "--force",
    ]
    code = main(args)
    printed = capsys.readouterr().out
    assert code == 1, printed  # nc-e failed
    assert "done 3, skipped 1, failed 1" in printed
    rows = {Path(r["scene"]).name: r for r in read_manifest(out / "manifest.csv")}
    assert {k: r["status"] for k, r in rows.items()} == {
        "nc-a": "done",
        "nc-b": "done",
        "nc-c": "done",
        "nc-d": "skipped",
        "nc-e": "failed",
    }
    assert "outside" in rows["nc-d"]["error"]
    assert "asset nir" in rows["nc-e"]["error"] and "404" in rows["nc-e"]["error"]
    # the same classes as the same bands from a local file, cut to the same window
    item = json.loads((out / "nc-a" / "nc-a.stac.json").read_text())
    window = item["properties"]["geovae:source"]["window"]
    ref = _local_classes(stac, tiny_rgbn, window, tmp_path / "local")
    for stem in ("nc-a", "nc-b", "nc-c"):
        got, t, crs = _classes(out / stem / f"{stem}.classes.tif")
        want, t_ref, crs_ref = _classes(ref)
        assert (t, crs) == (t_ref, crs_ref)
        assert np.array_equal(got, want), f"{stem}: {(got != want).sum()} pixels differ"
    # provenance: the source Item, the assets read, the search
    links = [ln for ln in item["links"] if ln["rel"] == "derived_from"]
    assert [ln["href"] for ln in links] == [f"{stac['base']}/collections/nc-landsat/items/nc-a"]
    assert [a["key"] for a in item["properties"]["geovae:source"]["assets"]] == ASSETS
    assert item["properties"]["datetime"].startswith("2000-05-24T15:40:00")
    search = json.loads((out / "collection.json").read_text())["geovae:search"]
    assert search["source"] == stac["base"] and search["collections"] == ["nc-landsat"]
    assert search["bbox"] == [w, s, e, n] and search["datetime"] == "2000-01-01/2000-12-31"
    assert search["query"] == {"eo:cloud_cover": {"lt": 20}} and search["assets"] == ASSETS
    # resume: nothing changed, nothing redone; a served file that changes is redone
    before = (out / "nc-a" / "_SUCCESS").read_text()
    assert main(args) == 1
    rows = {Path(r["scene"]).name: r["status"] for r in read_manifest(out / "manifest.csv")}
    assert rows["nc-a"] == rows["nc-b"] == rows["nc-c"] == "skipped"
    assert (out / "nc-a" / "_SUCCESS").read_text() == before
    path = stac["root"] / "files" / "nc-b" / "red.tif"
    path.write_bytes(path.read_bytes())  # a new version of the file on the server (new ETag)
    assert main(args) == 1
    capsys.readouterr()
    rows = {Path(r["scene"]).name: r["status"] for r in read_manifest(out / "manifest.csv")}
    assert (rows["nc-a"], rows["nc-b"], rows["nc-c"]) == ("skipped", "done", "skipped")


def test_segment_an_item_file_and_a_stack(
    stac: dict[str, Any], tiny_rgbn: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from geovae.cli import main
    from geovae.segment import segment_scene

    seg = [*[f"--{k.replace('_', '-')}={v}" for k, v in SEG.items() if k != "force"], "--force", "-q"]
    item_file = tmp_path / "item.json"
    item_file.write_text(json.dumps(stac["server"].items[0]))
    ref = segment_scene(stac["local"], tiny_rgbn, tmp_path / "ref", progress=False, **SEG).outputs["classes"]
    code = main(
        [
            "segment",
            str(item_file),
            "--assets",
            ",".join(ASSETS),
            "-m",
            str(tiny_rgbn),
            "-o",
            str(tmp_path / "item"),
            *seg,
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(_classes(tmp_path / "item" / "nc-a.classes.tif")[0], _classes(ref)[0])
    # --stack: single-band files on disk, stacked band-wise
    files = [str(stac["root"] / "files" / "nc-a" / f"{k}.tif") for k in ASSETS]
    code = main(["segment", *files, "--stack", "-m", str(tiny_rgbn), "-o", str(tmp_path / "stack"), *seg])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(_classes(tmp_path / "stack" / "red+green+blue+nir.classes.tif")[0], _classes(ref)[0])
    stac_item = json.loads((tmp_path / "stack" / "red+green+blue+nir.stac.json").read_text())
    assert [ln["href"] for ln in stac_item["links"] if ln["rel"] == "derived_from"] == files
    capsys.readouterr()
    # bad input: one line each, usage errors exit 2
    code = main(["segment", str(item_file), "-m", str(tiny_rgbn), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--assets" in err and "blue, green, nir, red, thumbnail" in err
    code = main(["segment", str(item_file), "--assets", "red,B08", "-m", str(tiny_rgbn), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'B08'" in err
    east = str(stac["root"] / "files" / "nc-d" / "red.tif")
    far = _write_cog(
        tmp_path / "far.tif",
        np.ones((1, 10, 10), np.uint8),
        stac["profile"] | {"transform": stac["profile"]["transform"] * rasterio.Affine.translation(5000, 0)},
    )
    code = main(["segment", east, str(far), "--stack", "-m", str(tiny_rgbn), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "does not overlap" in err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ options
def test_area_options_are_checked(tmp_path: Path) -> None:
    from geovae.sources import parse_bbox, read_area

    assert parse_bbox("7.4,46.9,7.5,46.96") == [7.4, 46.9, 7.5, 46.96]
    for bad in ("7.4,46.9,7.5", "a,b,c,d", "7.4,46.9,7.5,200", "7.4,47,7.5,46"):
        with pytest.raises(OptionError, match="--bbox"):
            parse_bbox(bad)
    fc = tmp_path / "area.geojson"
    squares = [shapely.geometry.box(0, 0, 1, 1), shapely.geometry.box(1, 0, 2, 1)]
    fc.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [{"type": "Feature", "geometry": shapely.geometry.mapping(s)} for s in squares],
            }
        )
    )
    assert shapely.geometry.shape(read_area(str(fc))).equals(shapely.geometry.box(0, 0, 2, 1))
    utm = tmp_path / "utm.geojson"
    utm.write_text(json.dumps(shapely.geometry.mapping(shapely.geometry.box(500000, 0, 501000, 1000))))
    with pytest.raises(OptionError, match="not longitudes and latitudes"):
        read_area(str(utm))
    with pytest.raises(OptionError, match="cannot read it as GeoJSON"):
        read_area(str(tmp_path / "missing.geojson"))
    with pytest.raises(OptionError, match="give one of them"):
        Search("http://x/", bbox=(0, 0, 1, 1), intersects=shapely.geometry.mapping(squares[0]))
    with pytest.raises(OptionError, match="--datetime"):
        Search("http://x/", datetime="June 2024")


def test_an_item_file_with_relative_hrefs(stac: dict[str, Any], tmp_path: Path) -> None:
    """A static catalogue's Item names its assets relative to itself."""
    folder = tmp_path / "catalog" / "nc-a"
    shutil.copytree(stac["root"] / "files" / "nc-a", folder)
    item = json.loads(json.dumps(stac["server"].items[0]))
    item["links"] = []
    for k in ASSETS:
        item["assets"][k]["href"] = f"./{k}.tif"
    (folder / "nc-a.json").write_text(json.dumps(item))
    (src,) = item_sources(read_items(str(folder / "nc-a.json")), ASSETS)
    assert [r.href for r in src.rasters] == [str(folder / f"{k}.tif") for k in ASSETS]
    scene = open_scene(src)
    local = open_scene(stac["local"])
    assert np.array_equal(scene.read(Window(0, 0, 100, 100))[0], local.read(Window(0, 0, 100, 100))[0])


def test_batch_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from geovae.cli import main

    code = main(["batch", "--stac", "http://127.0.0.1:9/", "-m", "m", "-o", str(tmp_path / "o")])
    assert code == 2 and "--assets" in capsys.readouterr().err
    code = main(["batch", "a.tif", "--collections", "x", "-m", "m", "-o", str(tmp_path / "o")])
    assert code == 2 and "--collections filters a --stac search" in capsys.readouterr().err
    code = main(["batch", "--stac", "http://127.0.0.1:9/", "a.tif", "--assets", "red", "-m", "m", "-o", "o"])
    assert code == 2 and "drop the SCENE paths" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
