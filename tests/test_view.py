"""geovae view on real outputs: what it finds, the tiles and polygons it serves, what it refuses,
its memory on a 20k x 20k output, and the page itself in headless Chromium."""

from __future__ import annotations

import http.client
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import ROOT, fixture_path
from rasterio.enums import Resampling
from rasterio.windows import Window
from torch import nn

import geovae
from geovae import batch
from geovae.model.base import ModelInfo, SegmentationModel
from geovae.scene import open_scene
from geovae.segment import segment_scene
from geovae.view import ViewError, show, view
from geovae.view.catalog import load_catalog
from geovae.view.polygons import PolygonLayer
from geovae.view.server import is_traversal
from geovae.view.tiles import TileRenderer

NAMES = ["dark", "dim", "light", "bright"]


# -- a real segment output ------------------------------------------------------------------


class Brightness(nn.Module):
    """Classes by smoothed brightness (mean of the normalised bands), split at ``thresholds``.

    A fixed model whose classes form regions, so the map shows large areas of one colour
    (a random net's salt-and-pepper would make every check sit on a class edge).
    """

    def __init__(self, bands: int, thresholds: list[float]) -> None:
        super().__init__()
        self.smooth = nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False)
        k = len(thresholds) + 1
        self.head = nn.Conv2d(bands, k, 1)
        with torch.no_grad():
            # logit_i = 8 (i s - t_1 - ... - t_i): class i beats class i-1 where s > t_i
            self.head.weight.zero_()
            for i in range(k):
                self.head.weight[i, :, 0, 0] = 8.0 * i / bands
            self.head.bias.copy_(8.0 * -torch.tensor([0.0, *np.cumsum(thresholds)], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.smooth(x))


def brightness_model(scene: Path) -> SegmentationModel:
    s = open_scene(scene)
    d, v = s.read_overview(max(s.width, s.height))
    mean, std = d[:, v].mean(1), d[:, v].std(1).clip(1e-6)
    bright = ((d[:, v] - mean[:, None]) / std[:, None]).mean(0)
    thresholds = np.quantile(bright, [0.3, 0.6, 0.85]).tolist()
    info = ModelInfo(
        in_channels=s.count,
        num_classes=4,
        mean=mean.tolist(),
        std=std.tolist(),
        tile_size=128,
        class_ids=[1, 2, 3, 4],
        class_names=NAMES,
    )
    return SegmentationModel(Brightness(s.count, thresholds), info, "cpu")


@pytest.fixture(scope="module")
def seg_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`segment` of the real NC Landsat-7 scene: classes, confidence, uncertainty, GPKG + GeoJSON."""
    nc = fixture_path("nc_landsat7_landclass96", "nc_lsat7_2000_6band_uint8.tif")
    out = tmp_path_factory.mktemp("seg") / "out"
    segment_scene(
        nc,
        brightness_model(nc),
        out,
        samples=1,
        formats=("gpkg", "geojson"),
        quicklook=False,
        progress=False,
        tile=128,
        overlap=32,
    )
    return out


def _report_path(folder: Path) -> Path:
    """The run report (``<stem>.json``; ``<stem>.stac.json`` is the STAC Item beside it)."""
    return next(p for p in folder.glob("*.json") if not p.name.endswith(".stac.json") and not p.is_symlink())


def _report(folder: Path) -> dict:
    return json.loads(_report_path(folder).read_text())


@pytest.fixture(scope="module")
def batch_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A batch folder as `geovae batch` leaves it: two real scenes (NC's west and east halves)
    segmented into their sub-folders, one failed row, manifest.csv written by geovae.batch."""
    nc = fixture_path("nc_landsat7_landclass96", "nc_lsat7_2000_6band_uint8.tif")
    root = tmp_path_factory.mktemp("batch")
    scenes = []
    with rasterio.open(nc) as src:
        for name, win in (("west", Window(0, 0, 124, 144)), ("east", Window(132, 0, 124, 144))):
            p = root / "scenes" / f"nc_{name}.tif"
            p.parent.mkdir(exist_ok=True)
            prof = src.profile | {"width": 124, "height": 144, "transform": src.window_transform(win)}
            with rasterio.open(p, "w", **prof) as dst:
                dst.write(src.read(window=win))
            scenes.append(str(p))
    scenes.append(str(root / "scenes" / "missing.tif"))
    out = root / "out"
    model = brightness_model(nc)
    rows = []
    for scene, folder in zip(scenes, batch.scene_folders(scenes), strict=True):
        row = batch.SceneRow(scene=scene, folder=folder, started="2026-01-01T00:00:00Z", seconds=1.0)
        if Path(scene).exists():
            res = segment_scene(
                scene, model, out / folder, formats=("gpkg",), quicklook=False, progress=False, tile=128, overlap=32
            )
            row.status, row.outputs = "done", [os.path.relpath(p, out) for p in sorted(set(res.outputs.values()))]
        else:
            row.status, row.error = "failed", f"SceneError: scene {scene} does not exist; check the path"
        rows.append(row)
    batch.write_manifest(out / batch.MANIFEST_NAME, rows)
    return out


# -- finding outputs -------------------------------------------------------------------------


def test_catalog_of_a_segment_folder(seg_out: Path) -> None:
    cat = load_catalog(seg_out)
    (e,) = cat.scenes
    assert set(e.rasters) == {"classes", "confidence", "uncertainty"}
    assert e.polygons is not None and e.polygons.suffix == ".gpkg"  # the indexed file first
    assert e.scene and Path(e.scene).name == "nc_lsat7_2000_6band_uint8.tif"
    assert [c["name"] for c in e.classes] == NAMES
    report = _report(seg_out)
    assert [c["area"] for c in e.classes] == [c["area_m2"] for c in report["classes"]]  # areas named by unit
    assert all(len(c["color"]) == 3 for c in e.classes)
    w, s, east, n = e.bounds
    assert -79 < w < east < -78.5 and 35.6 < s < n < 35.9  # Raleigh, NC
    # one report file gives the same
    assert load_catalog(e.report_path).scenes[0].rasters == e.rasters


def test_catalog_accepts_relative_paths_and_a_moved_folder(seg_out: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(seg_out, moved)
    stale = load_catalog(moved).scenes[0]  # the report's absolute paths point at the old folder
    assert all(p.parent == moved.resolve() for p in stale.rasters.values())
    report_path = _report_path(moved)
    report = json.loads(report_path.read_text())
    report["outputs"] = {k: Path(v).name for k, v in report["outputs"].items()}
    report_path.write_text(json.dumps(report))
    rel = load_catalog(moved).scenes[0]
    assert rel.rasters == stale.rasters and rel.polygons == stale.polygons


def test_missing_optional_layers_and_scene(seg_out: Path, tmp_path: Path) -> None:
    """Only the class raster left, the scene gone: the viewer shows what there is."""
    folder = tmp_path / "bare"
    folder.mkdir()
    report = _report(seg_out)
    for f in seg_out.glob("*.classes.tif"):
        shutil.copy(f, folder / f.name)
    report["outputs"] = {k: Path(v).name for k, v in report["outputs"].items()}
    report["scene"]["path"] = "/nowhere/scene.tif"
    (folder / "r.json").write_text(json.dumps(report))
    with view(folder) as v:
        doc = _get_json(v.url + "api/s0/scene")
        assert [layer["kind"] for layer in doc["layers"]] == ["classes"]
        assert doc["polygons"] is False and len(doc["classes"]) == 4
        status, _, _ = _get(v.url, "/tiles/s0/confidence/12/1152/1611.png")
        assert status == 404


def test_outputs_outside_the_folder_are_left_out(seg_out: Path, tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    report = _report(seg_out)  # absolute paths into seg_out, which is not under folder
    (folder / "r.json").write_text(json.dumps(report))
    e = load_catalog(folder).scenes[0]
    assert e.rasters == {} and e.polygons is None and e.error


def _killed_mid_commit(seg_out: Path, folder: Path, moved: int) -> str:
    """``folder`` as a run killed (kill -9) during its commit leaves it: the old report gone,
    ``moved`` files renamed into place, the rest and the report in the staging folder with
    the commit's journal. Returns the report's name."""
    stem = _report_path(seg_out).stem
    staging = folder / f".{stem}.geovae-run-0123456789ab.part"
    staging.mkdir(parents=True)
    names = sorted(p.name for p in seg_out.iterdir() if not p.name.startswith("."))
    report = f"{stem}.json"
    for n in names:
        shutil.copy(seg_out / n, staging / n)
    moves = [n for n in names if n != report] + [report]
    (staging / ".commit.json").write_text(json.dumps({"moves": moves, "remove": [], "last": report}))
    for n in moves[:moved]:
        os.replace(staging / n, folder / n)
    return report


def test_view_finishes_a_commit_its_run_was_killed_in(seg_out: Path, tmp_path: Path) -> None:
    """A run killed in the middle of its commit (kill -9) left files without their report,
    and view refused the folder ("holds no geovae run report") until the next run replayed
    the journal. View replays it: the whole set shows, the staging folder is gone."""
    folder = tmp_path / "out"
    report = _killed_mid_commit(seg_out, folder, moved=3)
    assert not (folder / report).exists()
    (e,) = load_catalog(folder).scenes
    assert not e.error and set(e.rasters) == {"classes", "confidence", "uncertainty"}
    assert (folder / report).is_file()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in seg_out.iterdir())


def test_view_of_a_killed_commit_it_cannot_finish_says_so(
    seg_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder view may not write (another user's): one line naming the set and what to do."""
    import geovae.view.catalog

    def read_only(folder: object) -> list[str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(geovae.view.catalog, "finish_commits", read_only)
    folder = tmp_path / "out"
    _killed_mid_commit(seg_out, folder, moved=3)
    with pytest.raises(ViewError, match=r"have no report yet: their run was killed .* rerun the run"):
        load_catalog(folder)


def test_not_an_output_folder(tmp_path: Path) -> None:
    with pytest.raises(ViewError, match="no geovae run report"):
        load_catalog(tmp_path)
    with pytest.raises(ViewError, match="does not exist"):
        load_catalog(tmp_path / "nope")
    from geovae.cli import main

    assert main(["view", str(tmp_path), "--no-browser"]) == 1


def test_catalog_of_a_batch_folder(batch_out: Path) -> None:
    cat = load_catalog(batch_out)
    assert cat.kind == "batch"
    assert [e.name for e in cat.scenes] == ["nc_west.tif", "nc_east.tif", "missing.tif"]
    west, east, missing = cat.scenes
    assert west.status == east.status == "done" and west.bounds and east.bounds
    assert west.bounds[2] < east.bounds[0] + 0.01  # side by side
    assert missing.status == "failed" and "does not exist" in missing.error and missing.bounds is None


def test_catalog_of_a_stac_collection(seg_out: Path, tmp_path: Path) -> None:
    folder = tmp_path / "stac"
    shutil.copytree(seg_out, folder / "item1")
    report = _report_path(folder / "item1")
    (folder / "item1" / "item.json").write_text(
        json.dumps(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": "nc-2000",
                "assets": {"report": {"href": report.name, "type": "application/json"}},
            }
        )
    )
    (folder / "collection.json").write_text(
        json.dumps(
            {
                "type": "Collection",
                "stac_version": "1.0.0",
                "id": "runs",
                "links": [
                    {"rel": "item", "href": "item1/item.json"},
                    {"rel": "item", "href": "https://example.org/x.json"},
                ],
            }
        )
    )
    cat = load_catalog(folder)
    assert cat.kind == "stac" and [e.name for e in cat.scenes] == ["nc-2000"]
    assert "classes" in cat.scenes[0].rasters


# -- tiles and polygons ----------------------------------------------------------------------


def _lonlat_to_tile(lon: float, lat: float, z: int) -> tuple[int, int]:
    n = 2**z
    x = int((lon + 180) / 360 * n)
    y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)
    return x, y


def _tile_pixel_lonlat(z: int, x: int, y: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude of each pixel centre of a tile."""
    n = 2**z
    px = (x + (np.arange(size) + 0.5) / size) / n
    py = (y + (np.arange(size) + 0.5) / size) / n
    lon = px * 360 - 180
    lat = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * py))))
    return np.meshgrid(lon, lat)


def _classes_at(classes_tif: Path, lon: np.ndarray, lat: np.ndarray, margin: int = 1) -> np.ndarray:
    """Class id under each point, -1 outside or where a neighbour within ``margin`` pixels differs."""
    from pyproj import Transformer

    with rasterio.open(classes_tif) as ds:
        cls = ds.read(1).astype(int)
        t = Transformer.from_crs("EPSG:4326", ds.crs, always_xy=True)
        xs, ys = t.transform(lon, lat)
        cols, rows = ~ds.transform @ (np.asarray(xs), np.asarray(ys))
    rows, cols = np.floor(rows).astype(int), np.floor(cols).astype(int)
    h, w = cls.shape
    out = np.full(rows.shape, -1)
    inside = (rows >= margin) & (rows < h - margin) & (cols >= margin) & (cols < w - margin)
    r, c = rows[inside], cols[inside]
    v = cls[r, c]
    same = np.ones_like(v, dtype=bool)
    for dr in range(-margin, margin + 1):
        for dc in range(-margin, margin + 1):
            same &= cls[r + dr, c + dc] == v
    out[inside] = np.where(same & (v != 255), v, -1)
    return out


def _colour_table(classes_tif: Path) -> dict[int, tuple[int, int, int]]:
    with rasterio.open(classes_tif) as ds:
        return {k: v[:3] for k, v in ds.colormap(1).items()}


def test_class_tiles_put_class_colours_where_the_raster_has_them(seg_out: Path) -> None:
    from PIL import Image

    e = load_catalog(seg_out).scenes[0]
    tiles = TileRenderer({e.id: e})
    lon0, lat0 = (e.bounds[0] + e.bounds[2]) / 2, (e.bounds[1] + e.bounds[3]) / 2
    table = _colour_table(e.rasters["classes"])
    for z in (12, 14):  # below and above the raster's resolution (35 m of Web Mercator)
        x, y = _lonlat_to_tile(lon0, lat0, z)
        img = np.asarray(Image.open(io.BytesIO(tiles.tile(e.id, "classes", z, x, y))).convert("RGBA"))
        lon, lat = _tile_pixel_lonlat(z, x, y)
        want = _classes_at(e.rasters["classes"], lon, lat)
        sure = want >= 0
        assert sure.sum() > 5000
        expected = np.array([table[int(c)] for c in want[sure]])
        assert (img[sure][:, :3] == expected).all(axis=1).mean() > 0.999
        assert (img[sure][:, 3] == 255).all()
    # far outside: transparent
    blank = np.asarray(Image.open(io.BytesIO(tiles.tile(e.id, "classes", 12, 0, 0))).convert("RGBA"))
    assert (blank[..., 3] == 0).all()


def test_rgb_tiles_use_the_quicklook_bands_and_stretch(seg_out: Path) -> None:
    from geovae.quicklook import _stretch, choose_rgb_bands

    e = load_catalog(seg_out).scenes[0]
    style = TileRenderer({e.id: e}).style(e.id, "scene")
    scene = open_scene(e.scene, nodata=e.nodata)
    bands = choose_rgb_bands(scene, e.band_names)
    assert style.indexes == [scene.bands[b - 1] for b in bands] == [3, 2, 1]
    data, valid = scene.read_overview(1280, bands=bands)
    ours = np.stack([np.clip((data[i] - lo) / (hi - lo), 0, 1) for i, (lo, hi) in enumerate(style.ranges)])
    np.testing.assert_allclose(ours[:, valid], _stretch(data, valid)[:, valid], atol=1e-6)


@pytest.mark.parametrize("source", ["gpkg", "geojson"])
def test_polygons_in_view_and_under_a_point(seg_out: Path, source: str) -> None:
    """The view query returns the largest polygons first, simplified; the point query returns
    the polygon whose class the class raster has there; GeoJSON answers as the GPKG does."""
    e = load_catalog(seg_out).scenes[0]
    layer = PolygonLayer(next(seg_out.glob(f"*.{source}")))
    try:
        w, s, east, n = e.bounds
        fc = json.loads(layer.in_view(w, s, east, n, 12, limit=50))
        assert fc["truncated"] is True and len(fc["features"]) == 50
        areas = [f["properties"]["area_m2"] for f in fc["features"]]
        assert areas[0] == max(areas) and min(areas) > 10 * 28.5**2
        all_at_16 = json.loads(layer.in_view(w, s, east, n, 16, limit=10**6))
        assert all_at_16["truncated"] is False
        assert len(all_at_16["features"]) == _n_polygons(seg_out)  # at full zoom every polygon is drawn
        # points: the class under them matches the raster's
        rng = np.random.default_rng(0)
        lon = rng.uniform(w, east, 100)
        lat = rng.uniform(s, n, 100)
        want = _classes_at(e.rasters["classes"], lon, lat, margin=1)
        checked = 0
        for lo, la, c in zip(lon, lat, want, strict=True):
            if c < 0:
                continue
            f = json.loads(layer.at(lo, la, 16) or "null")
            assert f is not None and f["properties"]["class_id"] == c
            assert f["properties"]["class_name"] == NAMES[c - 1]
            checked += 1
        assert checked >= 25
        assert layer.at(0.0, 0.0) is None
        assert json.loads(layer.in_view(10, 10, 11, 11, 12))["features"] == []
    finally:
        layer.close()


def _n_polygons(folder: Path) -> int:
    import pyogrio

    return int(pyogrio.read_info(next(folder.glob("*.gpkg")))["features"])


# -- the server: safe by default ---------------------------------------------------------------


def _get(url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
    """One raw request: the path is sent exactly as given (no client-side normalisation)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=bool(headers and "Host" in headers), skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        conn.close()


def _get_json(url: str) -> dict:
    from urllib.request import urlopen

    with urlopen(url, timeout=30) as r:
        return json.loads(r.read())


TRAVERSALS = [
    "/../../etc/passwd",
    "/files/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/static/..%2f..%2f..%2f..%2fetc/passwd",
    "/leaflet/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
    "/files/%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "/files/..%5c..%5c..%5cetc%5cpasswd",
    "/files/%00/etc/passwd",
    "/files//etc/passwd",
    "/files/etc/passwd",
    "/tiles/s0/classes/12/1/1.png/../../../../etc/passwd",
]


def test_traversal_refused_and_read_only(seg_out: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    shutil.copytree(seg_out, folder)
    (folder / "secret-link.json").symlink_to("/etc/passwd")
    with view(folder) as v:
        assert v.url.startswith("http://127.0.0.1:")
        for path in TRAVERSALS:
            status, body, _ = _get(v.url, path)
            assert status in (403, 404), path
            assert b"root:" not in body, path
        for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/files/%252e%252e%252fetc"):
            assert is_traversal(path), path
        # what is listed is served
        report = _report_path(folder)
        status, body, _ = _get(v.url, f"/files/{report.name}")
        assert status == 200 and json.loads(body)["outputs"]
        assert _get(v.url, "/files/secret-link.json")[0] == 404
        # nothing can be written
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, _, headers = _get(v.url, f"/files/{report.name}", method=method)
            assert status == 405 and headers.get("Allow") == "GET, HEAD"
        assert report.read_text()
        # a page elsewhere cannot reach it through DNS rebinding
        assert _get(v.url, "/api/catalog", headers={"Host": "evil.example:80"})[0] == 403
        status, _, headers = _get(v.url, "/")
        assert status == 200 and "default-src 'self'" in headers["Content-Security-Policy"]


def test_viewer_api_for_notebooks(seg_out: Path) -> None:
    v = geovae.view(seg_out)  # the module is callable
    try:
        assert callable(geovae.view.show)
        html = v._repr_html_()
        assert "<iframe" in html and v.url in html
        cat = _get_json(v.url + "api/catalog")
        assert [s["name"] for s in cat["scenes"]] == [_report_path(seg_out).stem]
        # show() takes a SegmentResult-like object and reuses a running viewer for the same folder
        result = type("SegmentResult", (), {"outputs": {"report": _report_path(seg_out)}})()
        v2 = show(result)
        assert v2.url != v.url and show(result) is v2
        v2.stop()
        assert not v2.running
    finally:
        v.stop()
    with pytest.raises(OSError):
        _get_json(v.url + "api/catalog")


def _viewer_process(folder: Path) -> subprocess.Popen[str]:
    """`geovae view FOLDER` as a user starts it from a terminal, where Ctrl-C reaches it.

    A test run that is itself a background job of a non-interactive shell (`nohup ... &`, some
    CI runners) has SIGINT ignored, which a child inherits across exec; a caught handler is
    reset to the default instead, so the viewer then answers the test's SIGINT as it would a
    user's Ctrl-C.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "geovae", "view", str(folder), "--no-browser"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def test_cli_prints_the_address_and_stops_on_ctrl_c(seg_out: Path) -> None:
    p = _viewer_process(seg_out)
    try:
        line = p.stdout.readline()
        assert line.startswith("geovae view: http://127.0.0.1:"), line + p.stderr.read()
        url = line.split()[2]
        assert _get_json(url + "api/catalog")["kind"] == "segment"
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=20) == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# -- memory on a big output --------------------------------------------------------------------


def _big_output(folder: Path, classes_src: Path, n: int = 20480) -> None:
    """A 20480 x 20480 class raster and confidence raster (real NC classes in 1024 px patches
    every 4096 px, sparse nodata blocks between, overviews), with a report naming them."""
    with rasterio.open(classes_src) as s:
        cls, prof, cmap, tags = s.read(1), s.profile, s.colormap(1), s.tags()
    patch = np.tile(cls, (3, 3))[:1024, :1024]
    conf = np.where(patch == 255, np.nan, 0.25 + 0.15 * (patch % 5)).astype("float32")
    outputs = {}
    for kind, arr, extra in (
        ("classes", patch, {}),
        ("confidence", conf, {"dtype": "float32", "nodata": float("nan")}),
    ):
        path = folder / f"big.{kind}.tif"
        with rasterio.open(path, "w", **(prof | {"width": n, "height": n, "sparse_ok": True, **extra})) as d:
            if kind == "classes":
                d.write_colormap(1, cmap)
                d.update_tags(**tags)
            for r in range(0, n, 4096):
                for c in range(0, n, 4096):
                    d.write(arr, 1, window=Window(c, r, 1024, 1024))
            d.build_overviews([2, 4, 8, 16, 32, 64, 128], Resampling.nearest)
        outputs[kind] = path.name
    (folder / "big.json").write_text(json.dumps({"outputs": outputs, "scene": {}, "classes": []}))


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_tiles_of_a_20k_output_stay_in_bounded_memory(seg_out: Path, tmp_path: Path) -> None:
    """RSS of the server stops growing after the first requests: 20480^2 rasters are read only
    through their overviews and GDAL's cache is capped, however many tiles are asked for."""
    _big_output(tmp_path, next(seg_out.glob("*.classes.tif")))
    p = _viewer_process(tmp_path)
    try:
        url = p.stdout.readline().split()[2]
        b = _get_json(url + "api/catalog")["scenes"][0]["bounds"]
        rng = np.random.default_rng(1)
        paths = []
        for z in range(8, 17):  # from a tile covering the raster to 1:1 pixels and beyond
            x0, y0 = _lonlat_to_tile(b[0], b[3], z)
            x1, y1 = _lonlat_to_tile(b[2], b[1], z)
            for _ in range(14):
                x, y = int(rng.integers(x0, x1 + 1)), int(rng.integers(y0, y1 + 1))
                paths += [f"/tiles/s0/classes/{z}/{x}/{y}.png", f"/tiles/s0/confidence/{z}/{x}/{y}.png"]
        order = rng.permutation(len(paths))
        paths = [paths[i] for i in order]

        def fetch(chunk: list[str]) -> None:
            for path in chunk:
                status, body, _ = _get(url, path)
                assert status == 200 and body[:4] == b"\x89PNG"

        fetch(paths[:40])  # warm up: imports, styles, PROJ, first blocks
        start = _rss_mib(p.pid)
        samples = []
        for i in range(40, len(paths), 40):
            chunk = paths[i : i + 40]
            threads = [threading.Thread(target=fetch, args=(chunk[k::2],)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            samples.append(_rss_mib(p.pid))
        growth = max(samples) - start
        print(f"RSS after warm-up {start:.0f} MiB, max {max(samples):.0f} MiB over {len(paths)} tiles")
        assert growth < 120, samples  # GDAL's cache is capped at 64 MiB
        assert max(samples) < 1200
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# -- the page, in headless Chromium ------------------------------------------------------------


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("browser tests need selenium (pip install -e .[dev])")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Chromium through Selenium and the system's chromedriver; nothing is downloaded."""
    binary, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=1100,760",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look anything up
    d = webdriver.Chrome(options=opts, service=Service(driver_path))
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()


def _wait_ready(d: object, timeout: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    time.sleep(0.2)  # let a move start its requests before asking whether they are done
    WebDriverWait(d, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script("return document.body.dataset.ready") == "1"
    )


def _screenshot(d: object) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(d.get_screenshot_as_png())).convert("RGB")).astype(int)


def _settled_map_colours(d: object, classes_tif: Path, want: float, timeout: float = 20) -> float:
    """:func:`_check_map_colours` once it reaches ``want``, or its last value after ``timeout``
    seconds: on a loaded machine the page can report ready a moment before the last tiles of a
    zoom are drawn (a CI run once read 0.87 there), and a share only grows as tiles arrive."""
    end = time.monotonic() + timeout
    share = _check_map_colours(d, classes_tif)
    while share <= want and time.monotonic() < end:
        time.sleep(0.5)
        share = _check_map_colours(d, classes_tif)
    return share


def _check_map_colours(d: object, classes_tif: Path) -> float:
    """Share of sampled map pixels (away from class edges) drawn in the class's colour."""
    rect = d.execute_script(
        "const r = geovae.map.getContainer().getBoundingClientRect();return [r.left, r.top, r.width, r.height];"
    )
    xs, ys = np.meshgrid(np.linspace(60, rect[2] - 60, 36), np.linspace(40, rect[3] - 40, 26))
    pts = np.column_stack([xs.ravel(), ys.ravel()]).round().astype(int).tolist()
    ll = np.array(
        d.execute_script(
            "return arguments[0].map(p => { const l = geovae.map.containerPointToLatLng(p); return [l.lng, l.lat]; });",
            pts,
        )
    )
    want = _classes_at(classes_tif, ll[:, 0], ll[:, 1], margin=1)
    table = _colour_table(classes_tif)
    shot = _screenshot(d)
    ok = total = 0
    for (x, y), c in zip(pts, want, strict=True):
        if c < 0:
            continue
        total += 1
        got = shot[int(rect[1] + y), int(rect[0] + x)]
        ok += int(np.abs(got - np.array(table[int(c)])).max() <= 6)
    assert total > 200
    return ok / total


def test_page_on_a_segment_output(browser: object, seg_out: Path) -> None:
    """The map shows the class colours where the class raster has them, the legend names the
    classes, and a click on a polygon shows its class."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    with view(seg_out) as v:
        d.get(v.url)
        _wait_ready(d)
        names = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#legend .class-name")]
        assert names == NAMES
        kinds = [
            e.get_attribute("data-layer") for e in d.find_elements(By.CSS_SELECTOR, "#layers input[type=checkbox]")
        ]
        assert kinds == ["scene", "classes", "confidence", "uncertainty", "polygons"]

        # classes alone, opaque, at a zoom where a raster pixel is about 4 screen pixels
        classes_tif = next(seg_out.glob("*.classes.tif"))
        d.execute_script(
            "geovae.setLayerVisible('scene', false); geovae.setPolygons(false);"
            "geovae.setOpacity('classes', 1); geovae.map.setZoom(14, {animate: false});"
        )
        _wait_ready(d)
        assert _settled_map_colours(d, classes_tif, 0.97) > 0.97

        # click inside a large region: the polygon there is named in the popup and the panel
        e = load_catalog(seg_out).scenes[0]
        lon0, lat0 = d.execute_script("const c = geovae.map.getCenter(); return [c.lng, c.lat];")
        lon, lat = _tile_pixel_lonlat(14, *_lonlat_to_tile(lon0, lat0, 14))
        sure = _classes_at(e.rasters["classes"], lon, lat, margin=3)
        i, j = np.argwhere(sure > 0)[len(np.argwhere(sure > 0)) // 2]
        target = (float(lon[i, j]), float(lat[i, j]))
        px, py = d.execute_script(
            "const p = geovae.map.latLngToContainerPoint([arguments[1], arguments[0]]);return [p.x, p.y];", *target
        )
        m = d.find_element(By.ID, "map")
        d.execute_script("geovae.setPolygons(true);")
        _wait_ready(d)
        # on a loaded machine the polygon layer can report ready before its features take
        # clicks; a click that finds none opens no popup, so click again until one opens
        for _ in range(8):
            ActionChains(d).move_to_element_with_offset(
                m, px - m.size["width"] / 2, py - m.size["height"] / 2
            ).click().perform()
            try:
                WebDriverWait(d, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".leaflet-popup-content strong"))
                break
            except TimeoutException:
                continue
        want = NAMES[int(sure[i, j]) - 1]
        # textContent, not .text: WebDriver's visible text is empty while the popup fades in
        assert d.find_element(By.CSS_SELECTOR, ".leaflet-popup-content strong").get_attribute("textContent") == want
        assert d.find_element(By.CSS_SELECTOR, "#info .polygon-class").text == want
        logs = [entry for entry in d.get_log("browser") if entry["level"] == "SEVERE"]
        assert not logs, logs


def test_page_on_a_batch_output(browser: object, batch_out: Path) -> None:
    """The scenes are listed (a failed one with its status); choosing one zooms to it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    cat = load_catalog(batch_out)
    with view(batch_out) as v:
        d.get(v.url)
        _wait_ready(d)
        items = d.find_elements(By.CSS_SELECTOR, "#scenes li")
        assert [i.find_element(By.CSS_SELECTOR, ".scene-name").text for i in items] == [e.name for e in cat.scenes]
        assert "failed" in items[2].get_attribute("class")
        for k in (1, 0):
            items[k].click()
            name = cat.scenes[k].name
            WebDriverWait(d, 30).until(lambda d, name=name: d.find_element(By.ID, "subtitle").text == name)
            _wait_ready(d)
            w, s, e, n = cat.scenes[k].bounds
            lon, lat = d.execute_script("const c = geovae.map.getCenter(); return [c.lng, c.lat];")
            assert w < lon < e and s < lat < n
            assert [x.text for x in d.find_elements(By.CSS_SELECTOR, "#legend .class-name")] == NAMES
        d.execute_script(
            "geovae.setLayerVisible('scene', false); geovae.setPolygons(false);"
            "geovae.setOpacity('classes', 1); geovae.map.setZoom(14, {animate: false});"
        )
        _wait_ready(d)
        assert _settled_map_colours(d, cat.scenes[0].rasters["classes"], 0.97) > 0.97


def test_scenes_of_one_file_name_get_distinct_names(batch_out: Path, tmp_path: Path) -> None:
    """A batch of several scenes called y.tif listed four entries all named "y.tif": each
    name now carries as many of its folders as tell it apart (the same scene twice: "(2)")."""
    out = tmp_path / "out"
    out.mkdir()
    scenes = [f"/data/{d}/y.tif" for d in ("2020/a", "2021/a", "2021/b", "2021/b")] + ["/data/z.tif"]
    rows = [batch.SceneRow(scene=s, folder=f"f{i}", status="failed", error="x") for i, s in enumerate(scenes)]
    batch.write_manifest(out / batch.MANIFEST_NAME, rows)
    names = [e.name for e in load_catalog(out).scenes]
    assert names == ["2020/a/y.tif", "2021/a/y.tif", "b/y.tif", "b/y.tif (2)", "z.tif"]
    assert [e.name for e in load_catalog(batch_out).scenes] == ["nc_west.tif", "nc_east.tif", "missing.tif"]


def test_scenes_whose_paths_differ_only_in_host_or_query_get_distinct_names(tmp_path: Path) -> None:
    """Scenes in two buckets (s3://b1/y.tif, s3://b2/y.tif) were both "y.tif": the path of a
    URL dropped its host. Paths that no shown part tells apart (a query, a separator) are
    numbered, never shown twice, and a number a scene's own name holds is not reused."""
    from geovae.view.catalog import distinct_names

    out = tmp_path / "out"
    out.mkdir()
    scenes = ["s3://b1/y.tif", "s3://b2/y.tif", "https://h/x.tif?sig=1", "https://h/x.tif?sig=2"]
    rows = [batch.SceneRow(scene=s, folder=f"f{i}", status="failed", error="x") for i, s in enumerate(scenes)]
    batch.write_manifest(out / batch.MANIFEST_NAME, rows)
    names = [e.name for e in load_catalog(out).scenes]
    assert names[:2] == ["b1/y.tif", "b2/y.tif"]
    assert len(set(names)) == len(scenes), names
    assert distinct_names(["a\\y.tif", "a/y.tif"]) == ["a/y.tif", "a/y.tif (2)"]
    assert distinct_names(["/x/y.tif", "/x/y.tif", "/x/y.tif (2)"]) == ["y.tif", "y.tif (3)", "y.tif (2)"]
    assert distinct_names(["C:\\d\\a\\y.tif", "C:\\d\\b\\y.tif"]) == ["a/y.tif", "b/y.tif"]
