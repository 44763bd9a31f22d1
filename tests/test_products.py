"""Outputs that open as users expect: real COGs, class tables GDAL and QGIS read,
QGIS styles, a STAC Item, a report a pipeline can use, and the Python API around them.

One real segment run of the NC Landsat-7 window, tiled 2 x 2 into a scene larger than one
256-px COG tile (every raster, every polygon format), serves the module; each test checks its
outputs with the tools users have.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import rasterio

STEM = "nc_lsat7_2000_6band_uint8"
RASTERS = ("classes", "confidence", "uncertainty", "reconstruction_error")
CLASS_NAMES = ["water", "forest", "town"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed NC window (256 x 144) tiled 2 x 2 on its own grid: 512 x 288 real pixels,
    so that the outputs have an overview level (a raster within one 256-px tile needs none)."""
    from conftest import fixture_path

    with rasterio.open(fixture_path("nc_landsat7_landclass96", f"{STEM}.tif")) as src:
        data, profile, names = src.read(), src.profile, src.descriptions
    big = np.tile(data, (1, 2, 2))
    out = tmp_path_factory.mktemp("scene") / f"{STEM}.tif"
    with rasterio.open(out, "w", **(profile | {"width": big.shape[2], "height": big.shape[1]})) as dst:
        dst.write(big)
        dst.descriptions = names
    return out


@pytest.fixture(scope="module")
def model(scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_outputs import _model_for

    return _model_for(scene, tmp_path_factory.mktemp("model") / "m6.safetensors")


@pytest.fixture(scope="module")
def run(scene: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from geovae.segment import segment_scene

    out = tmp_path_factory.mktemp("run")
    return segment_scene(
        scene, model, out, samples=2, reconstruction=True, formats=("geojson", "gpkg", "parquet"), progress=False
    )


# -- 1. COGs ------------------------------------------------------------------------------


def test_every_raster_is_a_valid_cog_on_the_scene_grid(run: Any, scene: Path) -> None:
    from rio_cogeo.cogeo import cog_validate

    with rasterio.open(scene) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    expect = {
        "classes": ("uint8", 2, 1),
        "confidence": ("float32", 3, 1),
        "uncertainty": ("float32", 3, 2),
        "reconstruction_error": ("float32", 3, 1),
    }
    for kind in RASTERS:
        path = run.outputs[kind]
        valid, errors, _warnings = cog_validate(str(path), quiet=True)
        assert valid and not errors, (kind, errors)
        with rasterio.open(path) as ds:
            assert (ds.crs, ds.transform, ds.shape) == (crs, transform, shape), kind
            dtype, predictor, count = expect[kind]
            assert ds.dtypes == (dtype,) * count and ds.count == count
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert ds.compression.name.lower() == "zstd" and ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == str(
                predictor
            )
            assert ds.block_shapes == [(256, 256)] * count and ds.overviews(1) == [2]
            assert all(ds.descriptions), "band descriptions survive the COG copy"
            if kind == "classes":
                assert ds.nodata == 255 and json.loads(ds.tags()["CLASSES"])[0]["name"] == "water"
                # mode resampling keeps class ids: no value in the overview that is not a class
                ov = ds.read(1, out_shape=(ds.height // 2, ds.width // 2))
                assert set(np.unique(ov)) <= {0, 1, 2, 255}
            else:
                assert math.isnan(ds.nodata)
        # nothing but the outputs is left in the folder (no scratch file, no .ovr.tmp)
    assert not [p for p in Path(run.outputs["classes"]).parent.iterdir() if p.name.startswith(".")]


# -- 2. class names and colours --------------------------------------------------------------


def _aux(run: Any) -> ET.Element:
    return ET.parse(run.outputs["classes_aux"]).getroot()


def test_class_raster_sidecar_names_every_class_with_its_colour(run: Any) -> None:
    info_colors = run.report["model"]["class_colors"]
    band = _aux(run).find("PAMRasterBand")
    assert band is not None and band.get("band") == "1"
    assert [c.text or "" for c in band.find("CategoryNames")] == CLASS_NAMES
    # a colour table as long as the classes: no opaque-black filler up to 256 entries
    entries = [[int(e.get(k)) for k in ("c1", "c2", "c3", "c4")] for e in band.find("ColorTable")]
    assert entries == [[*c, 255] for c in info_colors]
    rat = band.find("GDALRasterAttributeTable")
    fields = {
        f.find("Name").text: (int(f.find("Type").text), int(f.find("Usage").text)) for f in rat.findall("FieldDefn")
    }
    assert fields == {
        "value": (0, 5),
        "class_name": (2, 2),
        "red": (0, 6),
        "green": (0, 7),
        "blue": (0, 8),
        "pixels": (0, 1),
    }
    rows = [[f.text for f in r.findall("F")] for r in rat.findall("Row")]
    pixels = {c["name"]: c["pixels"] for c in run.report["classes"]}
    assert rows == [[str(i), n, *map(str, c), str(pixels[n])] for i, n, c in zip(range(3), CLASS_NAMES, info_colors)]
    # GDAL (through rasterio) takes the sidecar's table over the TIFF's 256-entry palette
    with rasterio.open(run.outputs["classes"]) as ds:
        assert ds.colormap(1) == {i: (*c, 255) for i, c in enumerate(info_colors)}


def test_class_names_read_back_with_gdalinfo(run: Any) -> None:
    gdalinfo = shutil.which("gdalinfo")
    if gdalinfo is None:
        pytest.skip("gdalinfo not installed (apt-get install gdal-bin); the sidecar is checked by parsing it above")
    d = json.loads(
        subprocess.run(
            [gdalinfo, "-json", str(run.outputs["classes"])], capture_output=True, text=True, check=True
        ).stdout
    )
    band = d["bands"][0]
    assert band["categories"] == CLASS_NAMES
    assert band["colorTable"]["count"] == 3
    assert [r["f"][1] for r in d["rat"]["row"]] == CLASS_NAMES
    assert band["noDataValue"] == 255


def test_the_sidecar_travels_with_the_raster_and_the_report_lists_it(run: Any) -> None:
    folder = Path(run.outputs["report"]).parent
    assert Path(run.outputs["classes_aux"]) == Path(f"{run.outputs['classes']}.aux.xml")
    assert set(run.report["outputs"].values()) == {p.name for p in folder.iterdir()}


# -- QGIS styles ------------------------------------------------------------------------------


def test_qml_styles_name_every_class_in_its_colour(run: Any) -> None:
    colors = ["#{:02x}{:02x}{:02x}".format(*c) for c in run.report["model"]["class_colors"]]
    root = ET.parse(run.outputs["classes_style"]).getroot()
    r = root.find("pipe/rasterrenderer")
    assert root.tag == "qgis" and r.get("type") == "paletted" and r.get("band") == "1"
    entries = [(int(e.get("value")), e.get("label"), e.get("color")) for e in r.find("colorPalette")]
    assert entries == list(zip(range(3), CLASS_NAMES, colors))
    for kind, hi in (("confidence", 1.0), ("uncertainty", math.log(3)), ("reconstruction_error", None)):
        r = ET.parse(run.outputs[f"{kind}_style"]).getroot().find("pipe/rasterrenderer")
        assert r.get("type") == "singlebandpseudocolor"
        shader = r.find("rastershader/colorrampshader")
        items = [float(i.get("value")) for i in shader.findall("item")]
        assert len(items) >= 2 and items == sorted(items)
        if hi is not None:
            assert items[-1] == pytest.approx(hi, rel=1e-5)
    # GeoJSON and GeoParquet: QGIS loads <stem>.qml for <stem>.geojson
    _check_polygon_qml(ET.parse(run.outputs["polygons_style"]).getroot(), colors)
    assert Path(run.outputs["polygons_style"]).stem == Path(run.outputs["geojson"]).stem


def _check_polygon_qml(root: ET.Element, colors: list[str]) -> None:
    r = root.find("renderer-v2")
    assert r.get("type") == "categorizedSymbol" and r.get("attr") == "class_name"
    cats = {c.get("value"): c.get("symbol") for c in r.find("categories")}
    assert set(cats) == set(CLASS_NAMES)
    symbols = {s.get("name"): s for s in r.find("symbols")}
    for name, color in zip(CLASS_NAMES, colors):
        opt = symbols[cats[name]].find("layer/Option/Option[@name='color']")
        rgb = [int(v) for v in opt.get("value").split(",")[:3]]
        assert "#{:02x}{:02x}{:02x}".format(*rgb) == color


def test_geopackage_carries_qgis_default_style(run: Any) -> None:
    import pyogrio

    gpkg = run.outputs["gpkg"]
    layers = dict(pyogrio.list_layers(gpkg))
    assert layers[STEM] == "Polygon" and "layer_styles" in layers
    styles = pyogrio.read_dataframe(gpkg, layer="layer_styles")
    assert list(styles.columns) == [
        "f_table_catalog",
        "f_table_schema",
        "f_table_name",
        "f_geometry_column",
        "styleName",
        "styleQML",
        "styleSLD",
        "useAsDefault",
        "description",
        "owner",
        "ui",
        "update_time",
    ]
    assert len(styles) == 1
    row = styles.iloc[0]
    geom = pyogrio.read_info(gpkg, layer=STEM)["geometry_name"]
    assert row.f_table_name == STEM and row.f_geometry_column == geom and bool(row.useAsDefault)
    colors = ["#{:02x}{:02x}{:02x}".format(*c) for c in run.report["model"]["class_colors"]]
    _check_polygon_qml(ET.fromstring(row.styleQML), colors)
    sld = ET.fromstring(row.styleSLD)
    assert len(sld.findall(".//{http://www.opengis.net/se}Rule")) == 3
    with sqlite3.connect(gpkg) as con:  # registered as GDAL and QGIS register it
        assert con.execute("SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchone() == (
            "attributes",
        )
    con.close()


def test_layer_style_replaces_only_its_own_row(tmp_path: Path, run: Any) -> None:
    import pyogrio

    from geovae.styles import read_layer_styles, write_layer_style

    gpkg = tmp_path / "both.gpkg"
    shutil.copyfile(run.outputs["gpkg"], gpkg)
    write_layer_style(gpkg, "other", "geom", ["a"], [(1, 2, 3)])
    write_layer_style(gpkg, STEM, "geom", ["x", "y"], [(1, 2, 3), (4, 5, 6)])
    rows = read_layer_styles(gpkg)
    assert sorted(r["f_table_name"] for r in rows) == sorted(["other", STEM])
    mine = next(r for r in rows if r["f_table_name"] == STEM)
    assert 'value="x"' in mine["styleQML"] and len(pyogrio.read_dataframe(gpkg, layer=STEM)) > 0


# -- 3. STAC ----------------------------------------------------------------------------------


class _OfflineValidator:
    """pystac's JSON-schema validator on its bundled core schemas; extensions are recorded
    (their schemas live on the network) and checked field by field in the tests."""

    def __new__(cls) -> Any:
        from pystac.validation import JsonSchemaSTACValidator

        class V(JsonSchemaSTACValidator):
            extensions: ClassVar[list[str]] = []

            def validate_extension(
                self,
                stac_dict: dict[str, Any],
                stac_object_type: Any,
                stac_version: str,
                extension_id: str,
                href: str | None = None,
            ) -> None:
                self.extensions.append(extension_id)
                return None

        return V()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the network: every socket connection fails."""
    import socket

    def refuse(*a: object, **k: object) -> None:
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_stac_item_validates_and_describes_the_outputs(run: Any, model: Path, offline: None) -> None:
    import pystac

    from geovae.stac import EXTENSIONS

    path = Path(run.outputs["stac"])
    assert path.name == f"{STEM}.stac.json"
    item = pystac.Item.from_file(str(path))
    v = _OfflineValidator()
    item.validate(validator=v)
    assert sorted(v.extensions) == sorted(EXTENSIONS.values())
    assert item.id == STEM and item.datetime is not None
    # footprint in WGS84: the report's bbox, and a polygon inside it
    assert item.bbox == pytest.approx(run.report["scene"]["bounds_wgs84"], abs=1e-6)
    assert item.geometry["type"] == "Polygon"
    lons, lats = zip(*item.geometry["coordinates"][0])
    assert min(lons) >= item.bbox[0] - 1e-9 and max(lats) <= item.bbox[3] + 1e-9
    # projection extension
    p = item.properties
    assert p["proj:code"] == "EPSG:3358" and p["proj:shape"] == [288, 512]
    assert p["proj:transform"] == run.report["scene"]["transform"]
    # processing (provenance)
    assert p["processing:software"]["geovae"] == run.report["geovae_version"]
    assert datetime.fromisoformat(p["processing:datetime"]) == datetime.fromisoformat(run.report["created"])
    folder = path.parent
    for key, asset in item.assets.items():
        f = folder / asset.href
        assert f.is_file() and asset.href.startswith("./"), key
        # file extension: size and a sha2-256 multihash
        assert asset.extra_fields["file:size"] == f.stat().st_size
        assert asset.extra_fields["file:checksum"] == "1220" + hashlib.sha256(f.read_bytes()).hexdigest()
        assert asset.roles
    assert set(item.assets) == set(run.outputs) - {"stac"}
    for kind in RASTERS:
        a = item.assets[kind]
        assert a.media_type == "image/tiff; application=geotiff; profile=cloud-optimized"
        bands = a.extra_fields["raster:bands"]
        with rasterio.open(run.outputs[kind]) as ds:
            assert len(bands) == ds.count
            data = ds.read(masked=True)
        for b, band in enumerate(bands):
            assert band["data_type"] == ("uint8" if kind == "classes" else "float32")
            assert band["nodata"] == (255 if kind == "classes" else "nan")
            st = band["statistics"]
            vals = data[b].compressed().astype(np.float64)
            assert st["minimum"] == pytest.approx(vals.min()) and st["maximum"] == pytest.approx(vals.max())
            assert st["mean"] == pytest.approx(vals.mean(), rel=1e-6)
            assert st["valid_percent"] == pytest.approx(100 * vals.size / data[b].size)
    classes = item.assets["classes"].extra_fields["classification:classes"]
    colors = run.report["model"]["class_colors"]
    assert [(c["value"], c["title"], c["color_hint"]) for c in classes if not c.get("nodata")] == [
        (i, n, "{:02X}{:02X}{:02X}".format(*colors[i])) for i, n in enumerate(CLASS_NAMES)
    ]
    assert all(c["name"].replace("_", "").replace("-", "").isalnum() for c in classes)
    assert [c["value"] for c in classes if c.get("nodata")] == [255]
    assert item.assets["geojson"].media_type == "application/geo+json"
    assert item.assets["quicklook"].roles == ["overview", "visual"]
    # the model, with its checksum, and the scene
    ml = item.get_single_link("ml-model")
    assert ml is not None and Path(ml.href) == model.resolve()
    assert ml.extra_fields["file:checksum"] == "1220" + run.report["model"]["sha256"]
    assert item.get_single_link("derived_from") is not None
    # round trip
    again = pystac.Item.from_dict(item.to_dict())
    assert again.to_dict() == item.to_dict()


# -- 5. the report ------------------------------------------------------------------------------


def test_report_is_what_a_pipeline_needs(run: Any, model: Path, scene: Path) -> None:
    import geopandas as gpd
    import rasterio.warp

    r = run.report
    created = datetime.fromisoformat(r["created"])
    assert created.tzinfo is not None
    assert (
        set(r["versions"]) >= {"geovae", "torch", "gdal", "rasterio"} and r["geovae_version"] == r["versions"]["geovae"]
    )
    assert r["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    with rasterio.open(scene) as src:
        want = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
    assert r["scene"]["bounds_wgs84"] == pytest.approx(list(want))
    folder = Path(run.outputs["report"]).parent
    for fmt in ("geojson", "gpkg", "parquet"):
        n = len(
            gpd.read_parquet(run.outputs[fmt])
            if fmt == "parquet"
            else gpd.read_file(run.outputs[fmt], layer=STEM if fmt == "gpkg" else None)
        )
        assert r["polygons"][fmt] == n
    assert {
        "validate_s",
        "predict_s",
        "model_s",
        "read_s",
        "rasters_close_s",
        "vectorize_s",
        "quicklook_s",
        "total_s",
    } <= set(r["timings_s"])
    assert all(v >= 0 for v in r["timings_s"].values())
    assert all(not Path(v).is_absolute() and (folder / v).is_file() for v in r["outputs"].values())
    assert r["outputs"]["report"] == f"{STEM}.json" and r["outputs"]["stac"] == f"{STEM}.stac.json"
    assert sum(c["pixels"] for c in r["classes"]) > 0 and r["area_unit"]
    # every documented top-level field is there
    assert set(r) >= {
        "created",
        "geovae_version",
        "versions",
        "scene",
        "model",
        "options",
        "tiles",
        "timings_s",
        "area_unit",
        "classes",
        "trust",
        "polygons",
        "outputs",
    }


# -- 4. the Python API --------------------------------------------------------------------------


def test_to_xarray_is_lazy_on_the_scene_grid(run: Any, scene: Path) -> None:
    import dask.array as da

    ds = run.to_xarray()
    assert set(ds.data_vars) == {"classes", "confidence", "uncertainty", "mutual_information", "reconstruction_error"}
    assert all(isinstance(v.data, da.Array) for v in ds.data_vars.values())
    with rasterio.open(scene) as src:
        assert ds.rio.crs == src.crs and ds.rio.transform() == src.transform and ds.rio.shape == src.shape
        with rasterio.open(run.outputs["classes"]) as c:
            assert np.array_equal(ds.classes.values, c.read(1))
    assert ds.classes.attrs["flag_meanings"].split() == CLASS_NAMES
    assert ds.classes.attrs["flag_values"] == [0, 1, 2]


def test_polygons_and_vectorize_return_geodataframes(run: Any) -> None:
    import geopandas as gpd

    import geovae

    gdf = run.polygons()
    assert isinstance(gdf, gpd.GeoDataFrame) and len(gdf) == run.report["polygons"]["gpkg"]
    assert set(gdf["class_name"]) <= set(CLASS_NAMES)
    mem = geovae.vectorize(run.outputs["classes"], None, confidence=run.outputs["confidence"])
    assert isinstance(mem, gpd.GeoDataFrame) and len(mem) == len(gdf)
    assert mem.crs == gdf.crs and mem["area_m2"].sum() == pytest.approx(gdf["area_m2"].sum())


def test_segment_scene_takes_an_open_dataset(run: Any, scene: Path, model: Path, tmp_path: Path) -> None:
    import geovae

    with rasterio.open(scene) as src:
        res = geovae.segment_scene(src, model, tmp_path, formats=(), quicklook=False, progress=False)
    with rasterio.open(res.outputs["classes"]) as a, rasterio.open(run.outputs["classes"]) as b:
        assert np.array_equal(a.read(1), b.read(1))


def test_load_model_predicts_numpy(model: Path, scene: Path) -> None:
    import geovae

    m = geovae.load_model(model, device="cpu")
    with rasterio.open(scene) as src:
        x = src.read(window=((0, 64), (0, 64))).astype(np.float32)[None]
    out = m.predict(x, samples=2, reconstruction=True)
    assert isinstance(out["probs"], np.ndarray) and out["probs"].shape == (1, 3, 64, 64)
    assert np.allclose(out["probs"].sum(1), 1, atol=1e-4)
    assert out["expected_entropy"].shape == (1, 64, 64) and out["reconstruction_error"].shape == (1, 64, 64)
    assert m.info.class_names == CLASS_NAMES


#: What an IRI reference (RFC 3987) may not hold raw: spaces and other controls, the
#: delimiters it excludes, and a % that does not start an escape.
_NOT_IN_AN_IRI = re.compile(r'[\x00-\x20\x7f<>"{}|\\^`]|%(?![0-9A-Fa-f]{2})')


def test_stac_hrefs_are_iri_references_whatever_the_scene_name(
    scene: Path, model: Path, tmp_path: Path, offline: None
) -> None:
    """A scene named "scène v1.2.final.tif" got asset hrefs with raw spaces, which are not IRI
    references; every local href is now percent-encoded, validates, and resolves back to
    its file with unquote."""
    from urllib.parse import unquote

    import pystac

    from geovae.segment import segment_scene

    odd = tmp_path / "in put" / "scène v1.2.final #1.tif"
    odd.parent.mkdir()
    odd.symlink_to(scene)
    res = segment_scene(odd, model, tmp_path / "out dir", formats=("gpkg",), progress=False)
    path = Path(res.outputs["stac"])
    d = json.loads(path.read_text())  # (pystac's from_file takes a "#" in a local path for a fragment)
    pystac.Item.from_dict(d).validate(validator=_OfflineValidator())
    hrefs = [a["href"] for a in d["assets"].values()] + [ln["href"] for ln in d["links"]]
    assert len(hrefs) >= len(res.outputs) + 1
    for h in hrefs:
        assert not _NOT_IN_AN_IRI.search(h), h
    assert d["assets"]["classes"]["href"] == "./sc%C3%A8ne%20v1.2.final%20%231.classes.tif"
    for key, asset in d["assets"].items():
        assert (path.parent / unquote(asset["href"])).is_file(), key
    scene_link = next(ln["href"] for ln in d["links"] if ln["rel"] == "derived_from")
    assert Path(unquote(scene_link)) == odd.resolve()
    assert not _NOT_IN_AN_IRI.search("./a%20b") and _NOT_IN_AN_IRI.search("./a b")  # the check can fail
