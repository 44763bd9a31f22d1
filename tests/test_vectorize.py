"""geovae.vector: block-wise polygons that tile the class raster, on the real rasters."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import rasterio.warp
import shapely
from affine import Affine
from conftest import fixture_path

from geovae.errors import GeovaeError, OptionError, SceneError
from geovae.vector import OpenState, VectorizeResult, vectorize

NC_PIXEL_M2 = 28.5 * 28.5


def _read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(1), src.profile


def _write(path: Path, array: np.ndarray, profile: dict, **tags: str) -> Path:
    prof = dict(profile, dtype=array.dtype.name, count=1)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(array, 1)
        if tags:
            dst.update_tags(**tags)
    return path


@pytest.fixture
def pipeline_classes(nc_labels: Path, tmp_path: Path) -> Path:
    """The NC map as geovae's pipeline writes classes: ids 0..6, nodata 255, CLASS_ tags."""
    labels, profile = _read(nc_labels)
    classes = np.where(labels == 0, 255, labels - 1).astype(np.uint8)
    names = ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]
    profile.update(nodata=255)
    return _write(tmp_path / "nc.classes.tif", classes, profile, **{f"CLASS_{i}": n for i, n in enumerate(names)})


def _assert_areas_match_pixels(result: VectorizeResult, labels: np.ndarray, nodata: int, pixel_m2: float) -> None:
    ids, counts = np.unique(labels[labels != nodata], return_counts=True)
    assert set(result.class_areas_m2) == set(ids.tolist())
    for k, n in zip(ids.tolist(), counts.tolist()):
        assert result.class_areas_m2[k] == pytest.approx(n * pixel_m2, rel=0.005), f"class {k}"


# --------------------------------------------------------------------------------------
# polygons tile the raster


def test_polygons_tile_nc_label_map(nc_labels: Path, tmp_path: Path) -> None:
    labels, _ = _read(nc_labels)
    out = tmp_path / "nc.gpkg"
    result = vectorize(nc_labels, out, block_size=100)
    assert result.paths == [out] and out.exists()
    _assert_areas_match_pixels(result, labels, 0, NC_PIXEL_M2)
    gdf = gpd.read_file(out)
    assert len(gdf) == result.n_polygons
    assert 0 not in set(gdf.class_id)  # nodata never becomes a polygon
    assert gdf.is_valid.all() and (gdf.geom_type == "Polygon").all()
    # The file's own areas agree with the geometry and with the per-class sums.
    assert np.allclose(gdf.area_m2, gdf.area, rtol=1e-9)
    for k, v in gdf.groupby("class_id").area_m2.sum().items():
        assert v == pytest.approx((labels == k).sum() * NC_PIXEL_M2, rel=0.005)
    # Without a confidence raster the means are null, not zero.
    assert gdf.confidence_mean.isna().all() and gdf.uncertainty_mean.isna().all()
    # No two polygons overlap: the union's area is the sum of the areas.
    assert shapely.union_all(gdf.geometry.values).area == pytest.approx(gdf.area.sum(), rel=1e-9)


def test_polygons_tile_pipeline_style_raster(pipeline_classes: Path, tmp_path: Path) -> None:
    classes, _ = _read(pipeline_classes)
    result = vectorize(pipeline_classes, tmp_path / "p.parquet", block_size=128)
    _assert_areas_match_pixels(result, classes, 255, NC_PIXEL_M2)
    gdf = gpd.read_parquet(tmp_path / "p.parquet")
    assert 255 not in set(gdf.class_id) and 0 in set(gdf.class_id)  # class 0 is a real class here
    # Class names come from the raster's CLASS_<id> tags.
    assert dict(zip(gdf.class_id, gdf.class_name))[4] == "forest"
    assert dict(zip(gdf.class_id, gdf.class_name))[0] == "developed"


def test_class_names_fallback_and_override(nc_labels: Path, tmp_path: Path) -> None:
    vectorize(nc_labels, tmp_path / "a.gpkg", class_names={6: "water"})
    names = dict(zip(*[gpd.read_file(tmp_path / "a.gpkg")[c] for c in ("class_id", "class_name")]))
    assert names[6] == "water" and names[5] == "class 5"


# --------------------------------------------------------------------------------------
# no polygon is cut by a block line


def _canonical(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    key = gdf.geometry.representative_point()
    return gdf.assign(_x=key.x, _y=key.y).sort_values(["class_id", "_x", "_y"]).reset_index(drop=True)


def test_block_size_does_not_change_polygons(pipeline_classes: Path, tmp_path: Path) -> None:
    whole = vectorize(pipeline_classes, tmp_path / "whole.gpkg", block_size=4096)
    small = vectorize(pipeline_classes, tmp_path / "small.gpkg", block_size=64)
    odd = vectorize(pipeline_classes, tmp_path / "odd.gpkg", block_size=37)
    assert whole.n_polygons == small.n_polygons == odd.n_polygons > 250  # 275 in the NC window
    a = _canonical(gpd.read_file(tmp_path / "whole.gpkg"))
    for name in ("small.gpkg", "odd.gpkg"):
        b = _canonical(gpd.read_file(tmp_path / name))
        assert (a.class_id.to_numpy() == b.class_id.to_numpy()).all()
        # Same regions, geometrically identical (vertex order may differ).
        assert shapely.equals(a.geometry.values, b.geometry.values).all()
        assert np.allclose(a.area_m2, b.area_m2)


def test_region_spanning_many_blocks_is_one_polygon(pipeline_classes: Path, tmp_path: Path) -> None:
    block = 32  # the 256 x 144 NC window is 8 x 5 blocks
    vectorize(pipeline_classes, tmp_path / "b.gpkg", block_size=block)
    gdf = gpd.read_file(tmp_path / "b.gpkg")
    with rasterio.open(pipeline_classes) as src:
        inv = ~src.transform
        classes = src.read(1)
    # Pixel extent of each polygon: how many block lines it crosses.
    b = gdf.bounds.to_numpy()
    c0, r0 = inv @ (b[:, 0], b[:, 3])
    c1, r1 = inv @ (b[:, 2], b[:, 1])
    crossed = (np.floor((np.asarray(c1) - 1e-6) / block) - np.floor(np.asarray(c0) / block)) + (
        np.floor((np.asarray(r1) - 1e-6) / block) - np.floor(np.asarray(r0) / block)
    )
    assert crossed.max() >= 6  # a region that runs through many blocks...
    big = gdf.iloc[int(np.argmax(crossed))]
    # ...is one polygon holding every pixel of its connected region.
    assert big.geometry.geom_type == "Polygon"
    inside = rasterio.features.geometry_mask([big.geometry], classes.shape, src.transform, invert=True)
    assert (classes[inside] == big.class_id).all()
    assert inside.sum() * NC_PIXEL_M2 == pytest.approx(big.area_m2, rel=1e-9)
    # No other polygon of that class touches it along an edge (it would be the same region).
    same = gdf[(gdf.class_id == big.class_id) & (gdf.index != big.name)].geometry.values
    assert not shapely.relate_pattern(same, big.geometry, "F***1****").any()


# --------------------------------------------------------------------------------------
# round trip on real building footprints


def test_round_trip_spacenet_buildings(atlanta_mask: Path, tmp_path: Path) -> None:
    footprints = gpd.read_file(fixture_path("spacenet_solaris", "original", "geotiff_labels.geojson"))
    assert len(footprints) == 43
    vectorize(atlanta_mask, tmp_path / "b.gpkg", block_size=128)  # 900 px: blocks cut many roofs
    polys = gpd.read_file(tmp_path / "b.gpkg")
    polys = polys[polys.class_id == 1]
    footprints = footprints.to_crs(polys.crs)
    tree = shapely.STRtree(polys.geometry.values)
    ious = []
    for fp in footprints.geometry.values:
        cand = polys.geometry.values[tree.query(fp, predicate="intersects")]
        inter = shapely.area(shapely.intersection(fp, cand))
        union = shapely.area(shapely.union(fp, cand))
        ious.append(float((inter / union).max()) if len(cand) else 0.0)
    ious_a = np.array(ious)
    assert (ious_a >= 0.9).sum() >= 41
    assert np.median(ious_a) >= 0.95


# --------------------------------------------------------------------------------------
# formats


def _ring_coords(geom: dict) -> list[list[list[float]]]:
    polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
    return [ring for poly in polys for ring in poly]


def test_geojson_is_rfc7946_and_other_formats_keep_crs(nc_labels: Path, tmp_path: Path) -> None:
    outs = [tmp_path / "nc.geojson", tmp_path / "nc.gpkg", tmp_path / "nc.parquet"]
    result = vectorize(nc_labels, outs, block_size=200)
    assert result.paths == outs and all(p.exists() for p in outs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left

    doc = json.loads(outs[0].read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc  # RFC 7946 has no crs member
    assert len(doc["features"]) == result.n_polygons
    coords = np.array([xy for f in doc["features"] for ring in _ring_coords(f["geometry"]) for xy in ring])
    # Raleigh, NC in lon/lat order.
    assert (coords[:, 0] > -79.5).all() and (coords[:, 0] < -78).all()
    assert (coords[:, 1] > 35).all() and (coords[:, 1] < 36.5).all()
    gj = gpd.read_file(outs[0])
    assert gj.crs.to_epsg() == 4326 and gj.is_valid.all()
    polys = shapely.get_parts(gj.geometry.values)
    assert shapely.is_ccw(shapely.get_exterior_ring(polys)).all()  # right-hand rule: exteriors CCW
    holes = [shapely.get_interior_ring(p, i) for p in polys for i in range(shapely.get_num_interior_rings(p))]
    assert holes and not shapely.is_ccw(holes).any()  # ...and holes clockwise

    with rasterio.open(nc_labels) as src:
        crs = src.crs
    for path, reader in ((outs[1], gpd.read_file), (outs[2], gpd.read_parquet)):
        gdf = reader(path)
        assert gdf.crs == crs
        assert {"class_id", "class_name", "area_m2", "confidence_mean", "uncertainty_mean"} <= set(gdf.columns)
        assert len(gdf) == result.n_polygons
        assert gdf.area_m2.sum() == pytest.approx(sum(result.class_areas_m2.values()))
    # The same polygons in every file: the GeoJSON, back in the scene CRS, covers the same area.
    assert gj.to_crs(crs).area.sum() == pytest.approx(gdf.area.sum(), rel=1e-4)


def test_geographic_input_areas_in_square_metres(nc_labels: Path, tmp_path: Path) -> None:
    labels, profile = _read(nc_labels)
    labels = labels[100:300, 150:350]  # a 200 x 200 px crop keeps the test quick
    transform = profile["transform"] @ Affine.translation(150, 100)
    dst_transform, w, h = rasterio.warp.calculate_default_transform(
        profile["crs"], "EPSG:4326", 200, 200, *rasterio.transform.array_bounds(200, 200, transform)
    )
    warped = np.zeros((h, w), np.uint8)
    rasterio.warp.reproject(
        labels,
        warped,
        src_transform=transform,
        src_crs=profile["crs"],
        dst_transform=dst_transform,
        dst_crs="EPSG:4326",
        resampling=rasterio.warp.Resampling.nearest,
        src_nodata=0,
        dst_nodata=0,
    )
    prof = dict(profile, crs="EPSG:4326", transform=dst_transform, width=w, height=h, nodata=0)
    geo = _write(tmp_path / "geo.tif", warped, prof)
    result = vectorize(geo, [tmp_path / "geo.gpkg", tmp_path / "geo.geojson"], block_size=64)
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    for k, n in zip(ids.tolist(), counts.tolist()):
        if n >= 1000:  # nearest resampling moves small classes' edges by up to a pixel
            assert result.class_areas_m2[k] == pytest.approx(n * NC_PIXEL_M2, rel=0.02), f"class {k}"
    total = counts.sum() * NC_PIXEL_M2
    assert sum(result.class_areas_m2.values()) == pytest.approx(total, rel=0.01)
    # Simplifying a geographic raster takes its tolerance in metres too.
    simp = vectorize(geo, tmp_path / "geo_s.gpkg", simplify=40.0, block_size=64)
    assert sum(simp.class_areas_m2.values()) == pytest.approx(sum(result.class_areas_m2.values()), rel=0.005)


# --------------------------------------------------------------------------------------
# simplify, min_area, confidence


def test_simplify_keeps_shared_edges(pipeline_classes: Path, tmp_path: Path) -> None:
    exact = vectorize(pipeline_classes, tmp_path / "e.gpkg", block_size=128)
    simp = vectorize(pipeline_classes, tmp_path / "s.gpkg", simplify=60.0, block_size=128)
    e, s = gpd.read_file(tmp_path / "e.gpkg"), gpd.read_file(tmp_path / "s.gpkg")
    assert simp.n_polygons == exact.n_polygons and s.is_valid.all()
    n_simplified = shapely.get_num_coordinates(s.geometry.values).sum()
    assert n_simplified < 0.6 * shapely.get_num_coordinates(e.geometry.values).sum()
    geoms = s.geometry.values
    assert shapely.coverage_is_valid(geoms)
    # No overlaps: pairwise intersections of neighbours have no area...
    i, j = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = i < j
    overlap = shapely.area(shapely.intersection(geoms[i[keep]], geoms[j[keep]]))
    assert overlap.sum() < 1e-6 * s.area.sum()
    # ...and no gaps: the union covers what the exact polygons covered.
    union = shapely.union_all(geoms)
    assert union.area == pytest.approx(s.area.sum(), rel=1e-9)
    assert union.area == pytest.approx(e.area.sum(), rel=0.005)
    assert shapely.symmetric_difference(union, shapely.union_all(e.geometry.values)).area < 0.01 * union.area
    assert s.area_m2.to_numpy() == pytest.approx(s.area.to_numpy())  # areas describe what is written


def test_simplified_polygons_are_the_same_in_every_format(nc_labels: Path, tmp_path: Path) -> None:
    """With --simplify every format is copied from the one simplified GeoPackage."""
    outs = [tmp_path / "s.geojson", tmp_path / "s.gpkg", tmp_path / "s.parquet"]
    res = vectorize(nc_labels, outs, simplify=40.0, block_size=200)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    gpkg, pq, gj = gpd.read_file(outs[1]), gpd.read_parquet(outs[2]), gpd.read_file(outs[0])
    assert len(gpkg) == len(pq) == len(gj) == res.n_polygons
    assert shapely.equals_exact(gpkg.geometry.values, pq.geometry.values, tolerance=0).all()
    assert gpkg.crs == pq.crs and gj.crs.to_epsg() == 4326
    assert gj.to_crs(gpkg.crs).area.sum() == pytest.approx(gpkg.area.sum(), rel=1e-4)
    assert gpkg.area_m2.sum() == pytest.approx(sum(res.class_areas_m2.values()))
    # Only the GeoJSON asked for: the simplified polygons still reach it, and no file is left.
    only = vectorize(nc_labels, tmp_path / "only.geojson", simplify=40.0, block_size=200)
    assert only.n_polygons == res.n_polygons and len(gpd.read_file(tmp_path / "only.geojson")) == res.n_polygons
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_min_area_drops_small_polygons(nc_labels: Path, tmp_path: Path) -> None:
    full = gpd.read_file(vectorize(nc_labels, tmp_path / "f.gpkg", block_size=64).paths[0])
    threshold = 10 * NC_PIXEL_M2
    result = vectorize(nc_labels, tmp_path / "m.gpkg", min_area=threshold, block_size=64)
    kept = gpd.read_file(tmp_path / "m.gpkg")
    assert (kept.area_m2 >= threshold).all()
    # Decided after joining: a region cut into small pieces by block lines is still kept.
    assert len(kept) == result.n_polygons == (full.area_m2 >= threshold).sum() < len(full)
    assert kept.area_m2.sum() == pytest.approx(full.area_m2[full.area_m2 >= threshold].sum())


def test_confidence_and_uncertainty_means(nc_labels: Path, tmp_path: Path) -> None:
    labels, profile = _read(nc_labels)
    prof = dict(profile, dtype="float32", nodata=float("nan"))
    # Confidence is a known function of the class, with a NaN hole: means must ignore NaN.
    conf = (labels.astype(np.float32) / 10).astype(np.float32)
    conf[60:100, 40:200] = np.nan
    rows = np.broadcast_to(np.arange(labels.shape[0], dtype=np.float32)[:, None], labels.shape)
    unc = np.stack([rows, np.full_like(rows, 7.0)])  # band 1 (entropy) is the row index
    _write(tmp_path / "conf.tif", conf, prof)
    with rasterio.open(tmp_path / "unc.tif", "w", **dict(prof, count=2)) as dst:
        dst.write(unc)
    out = tmp_path / "c.gpkg"
    vectorize(nc_labels, out, confidence=tmp_path / "conf.tif", uncertainty=tmp_path / "unc.tif", block_size=64)
    gdf = gpd.read_file(out)
    finite = gdf.confidence_mean.notna()
    assert np.allclose(gdf.confidence_mean[finite], gdf.class_id[finite] / 10, atol=1e-6)
    # Polygons entirely inside the NaN hole have no confidence, and there are some.
    assert (~finite).sum() > 0
    # Entropy mean per polygon = mean row index of its pixels, checked on the biggest polygons.
    for _, row in gdf.nlargest(5, "area_m2").iterrows():
        inside = rasterio.features.geometry_mask([row.geometry], labels.shape, profile["transform"], invert=True)
        assert row.uncertainty_mean == pytest.approx(rows[inside].mean(), rel=1e-6)
    # Pixel-weighted, the means add back up to the raster's totals.
    npx = gdf.area_m2 / NC_PIXEL_M2
    assert (gdf.uncertainty_mean * npx).sum() == pytest.approx(rows[labels != 0].sum(), rel=1e-6)


def test_polygon_stream_fed_blocks_gives_the_polygons_of_the_finished_raster(
    pipeline_classes: Path, tmp_path: Path
) -> None:
    """PolygonStream is a block sink: blocks handed to add() in write order (last row and
    column smaller) give exactly the polygons and means of vectorising the same raster, and
    the GeoPackage is styled in the colours of the class table it was given, not read from
    a file (the raster here has names only, no colours)."""
    import sqlite3

    from geovae.blocks import Block
    from geovae.vector import LayerOptions, PolygonStream

    classes, profile = _read(pipeline_classes)
    conf = ((classes.astype(np.float32) + 1) / 10).astype(np.float32)
    conf[classes == 255] = np.nan
    conf[300:340, 50:500] = 0.25
    conf_path = _write(tmp_path / "conf.tif", conf, dict(profile, dtype="float32", nodata=float("nan")))
    height, width = classes.shape
    block = 100
    out = tmp_path / "s.gpkg"
    table = {i: {"name": f"name {i}", "color": [i + 1, 2 * i + 1, 3 * i + 1]} for i in range(7)}
    stream = PolygonStream(
        LayerOptions(
            targets=((out, out),),
            width=width,
            height=height,
            crs=profile["crs"],
            transform=profile["transform"],
            block=block,
            layer="nc",
        ),
        classes=table,
    )
    for r in range(0, height, block):
        for c in range(0, width, block):
            win = rasterio.windows.Window(c, r, min(block, width - c), min(block, height - r))
            part = (slice(r, r + block), slice(c, c + block))
            stream.add(Block(win, {"classes": classes[part][None], "confidence": conf[part][None]}))
    result = stream.close()
    got = gpd.read_file(out, layer="nc")
    ref = vectorize(pipeline_classes, None, confidence=conf_path, block_size=block)
    assert result.n_polygons == len(got) == len(ref) > 100
    a = got.assign(key=shapely.to_wkb(shapely.normalize(got.geometry.values))).sort_values("key")
    b = ref.assign(key=shapely.to_wkb(shapely.normalize(ref.geometry.values))).sort_values("key")
    assert (a.key.to_numpy() == b.key.to_numpy()).all()
    assert (a.class_id.to_numpy() == b.class_id.to_numpy()).all()
    assert np.allclose(a.confidence_mean, b.confidence_mean, rtol=1e-9, equal_nan=True)
    assert set(got.class_name) <= {f"name {i}" for i in range(7)}
    with sqlite3.connect(out) as con:
        (qml,) = con.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = 'nc'").fetchone()
    con.close()
    assert all(f'"{i + 1},{2 * i + 1},{3 * i + 1},255"' in qml for i in range(7))


# --------------------------------------------------------------------------------------
# pixel coordinates and bad input


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_raster_without_crs_gives_pixel_polygons(nc_labels: Path, tmp_path: Path) -> None:
    labels, profile = _read(nc_labels)
    prof = dict(profile)
    prof.pop("crs")
    prof["transform"] = Affine.identity()
    plain = _write(tmp_path / "plain.tif", labels[:100, :150], dict(prof, width=150, height=100))
    result = vectorize(plain, tmp_path / "plain.gpkg", block_size=32)
    gdf = gpd.read_file(tmp_path / "plain.gpkg")
    assert gdf.crs is None
    xmin, ymin, xmax, ymax = gdf.total_bounds
    assert (xmin, ymin, xmax, ymax) == (0, 0, 150, 100)
    ids, counts = np.unique(labels[:100, :150][labels[:100, :150] != 0], return_counts=True)
    assert result.class_areas_m2 == {int(k): float(n) for k, n in zip(ids, counts)}  # square pixels
    with pytest.raises(OptionError, match="GeoJSON needs a CRS"):
        vectorize(plain, tmp_path / "plain.geojson")
    assert not (tmp_path / "plain.geojson").exists()


def _one_line(err: GeovaeError) -> str:
    msg = str(err)
    assert "\n" not in msg and msg
    return msg


def test_bad_input(nc_labels: Path, tmp_path: Path) -> None:
    with pytest.raises(SceneError) as e:
        vectorize(tmp_path / "missing.tif", tmp_path / "x.gpkg")
    assert "does not exist" in _one_line(e.value)
    (tmp_path / "notes.tif").write_text("not a raster\n")
    with pytest.raises(SceneError) as e:
        vectorize(tmp_path / "notes.tif", tmp_path / "x.gpkg")
    _one_line(e.value)
    with pytest.raises(OptionError) as e:
        vectorize(nc_labels, tmp_path / "x.shp")
    assert ".geojson, .gpkg or .parquet" in _one_line(e.value)
    with pytest.raises(OptionError):
        vectorize(nc_labels, tmp_path / "x.gpkg", min_area=-1)
    with pytest.raises(OptionError):
        vectorize(nc_labels, tmp_path / "x.gpkg", connectivity=6)
    # A confidence raster on another grid.
    labels, profile = _read(nc_labels)
    small = _write(tmp_path / "small.tif", labels[:50, :50].astype(np.float32), dict(profile, width=50, height=50))
    with pytest.raises(OptionError) as e:
        vectorize(nc_labels, tmp_path / "x.gpkg", confidence=small)
    assert "another grid" in _one_line(e.value)
    # Class ids must be integers.
    floats = _write(tmp_path / "f.tif", labels.astype(np.float32), profile)
    with pytest.raises(SceneError):
        vectorize(floats, tmp_path / "x.gpkg")
    assert not (tmp_path / "x.gpkg").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_vectorize_never_writes_over_its_class_raster(nc_labels: Path, tmp_path: Path) -> None:
    """A GeoPackage can hold a raster: `vectorize classes.gpkg -o classes.gpkg` is refused with
    one line telling to choose another output file, and the raster is left byte for byte."""
    from geovae.errors import OutputError

    labels, profile = _read(nc_labels)
    gpkg = tmp_path / "classes.gpkg"
    keep = {"crs", "transform", "width", "height", "count", "dtype", "nodata"}
    with rasterio.open(gpkg, "w", driver="GPKG", **{k: v for k, v in profile.items() if k in keep}) as dst:
        dst.write(labels, 1)
    before = gpkg.read_bytes()
    with pytest.raises(OutputError) as e:
        vectorize(gpkg, gpkg)
    assert f"output {gpkg} is the input {gpkg}" in _one_line(e.value)
    assert str(e.value).endswith("choose another --out file")
    assert gpkg.read_bytes() == before


def test_connectivity_8_joins_diagonal_neighbours(tmp_path: Path) -> None:
    # Edge case real data lacks in a controlled form: a diagonal staircase across a block line.
    a = np.zeros((8, 8), np.uint8)
    for i in range(8):
        a[i, i] = 1
    prof = {
        "driver": "GTiff",
        "width": 8,
        "height": 8,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:32616",
        "transform": Affine(1, 0, 0, 0, -1, 8),
    }
    path = _write(tmp_path / "diag.tif", a, prof)
    r4 = vectorize(path, tmp_path / "d4.gpkg", block_size=3)
    r8 = vectorize(path, tmp_path / "d8.gpkg", block_size=3, connectivity=8)
    d4, d8 = gpd.read_file(tmp_path / "d4.gpkg"), gpd.read_file(tmp_path / "d8.gpkg")
    assert (d4.class_id == 1).sum() == 8  # eight separate pixels with 4-connectivity
    assert (d8.class_id == 1).sum() == 1  # one diagonal region with 8-connectivity
    assert r4.class_areas_m2[1] == r8.class_areas_m2[1] == 8.0
    assert d8.is_valid.all()


@pytest.mark.parametrize("connectivity", [4, 8])
def test_noise_raster_polygons_valid_and_means_exact(tmp_path: Path, connectivity: int) -> None:
    # Edge case real data lacks in bulk: random noise is full of pixels meeting only at a
    # corner, where rings touch themselves or holes touch shells. 4-connected output is
    # written without a validity pass (valid by construction), so prove it here.
    rng = np.random.default_rng(7)
    a = rng.integers(0, 3, (90, 110)).astype(np.uint8)
    a[40:70, 20:60] = np.repeat(np.repeat(rng.integers(0, 2, (15, 20)), 2, 0), 2, 1)  # blobs with holes
    a[rng.random(a.shape) < 0.05] = 255
    prof = {
        "driver": "GTiff",
        "width": 110,
        "height": 90,
        "count": 1,
        "dtype": "uint8",
        "nodata": 255,
        "crs": "EPSG:32616",
        "transform": Affine(0.5, 0, 1000, 0, -0.5, 2000),
    }
    path = _write(tmp_path / "noise.tif", a, prof)
    conf = rng.random(a.shape, dtype=np.float32)
    conf[rng.random(a.shape) < 0.1] = np.nan
    _write(tmp_path / "conf.tif", conf, dict(prof, dtype="float32", nodata=float("nan")))
    whole = vectorize(
        path, tmp_path / "w.gpkg", confidence=tmp_path / "conf.tif", block_size=4096, connectivity=connectivity
    )
    small = vectorize(
        path, tmp_path / "s.gpkg", confidence=tmp_path / "conf.tif", block_size=7, connectivity=connectivity
    )
    assert whole.n_polygons == small.n_polygons > 1000
    # Sorted by class and bounds: 8-connected regions repaired from different pieces may be
    # the same area written as different (equal) geometries, with other representative points.
    w, s = (
        gpd.read_file(tmp_path / n)
        .pipe(lambda g: g.join(g.bounds))
        .sort_values(["class_id", "minx", "miny", "maxx", "maxy", "area_m2"])
        .reset_index(drop=True)
        for n in ("w.gpkg", "s.gpkg")
    )
    for gdf in (w, s):
        assert gdf.is_valid.all()
        for k in range(3):
            assert gdf.area_m2[gdf.class_id == k].sum() == pytest.approx((a == k).sum() * 0.25, rel=1e-12)
    assert shapely.equals(w.geometry.values, s.geometry.values).all()
    # Means are exact pixel means over each polygon's non-NaN pixels, however it was cut.
    for gdf in (w, s):
        for _, row in gdf.sample(200, random_state=0).iterrows():
            inside = rasterio.features.geometry_mask([row.geometry], a.shape, prof["transform"], invert=True)
            vals = conf[inside & np.isfinite(conf)]
            if len(vals):
                assert row.confidence_mean == pytest.approx(vals.astype(np.float64).mean(), rel=1e-12)
            else:
                assert np.isnan(row.confidence_mean)


def _bars(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Vertical bars 8 px wide, classes 1 and 2 in turn, each cut into 160-px lengths by a
    1-px line of class 0; every column's cuts are 37 px lower than its left neighbour's, so
    bars span five 32-px block rows and end at different rows."""
    j = cols // 8
    bars = (1 + j % 2).astype(np.uint8)
    return np.where((rows - 37 * j) % 160 == 0, np.uint8(0), bars)


def _stream_bars(tmp_path: Path, block_rows: int) -> tuple[int, OpenState]:
    from geovae.blocks import Block
    from geovae.vector import LayerOptions, PolygonStream

    block, width = 32, 128
    height = block * block_rows
    out = tmp_path / f"bars{block_rows}.gpkg"
    stream = PolygonStream(
        LayerOptions(
            targets=((out, out),), width=width, height=height, crs=None, transform=Affine.identity(), block=block
        ),
        classes={i: {"name": f"c{i}", "color": None} for i in range(3)},
    )
    for r in range(0, height, block):
        for c in range(0, width, block):
            rr, cc = np.mgrid[r : r + block, c : c + block]
            cls = _bars(rr, cc)
            conf = np.ones(cls.shape, np.float32)
            stream.add(
                Block(rasterio.windows.Window(c, r, block, block), {"classes": cls[None], "confidence": conf[None]})
            )
    result = stream.close()
    rr, cc = np.mgrid[0:height, 0:width]
    expected = sum(1 for _ in rasterio.features.shapes(_bars(rr, cc), connectivity=4))
    assert result.n_polygons == expected
    return expected, stream.open_state


@pytest.mark.filterwarnings("ignore:'crs' was not provided:UserWarning")
def test_open_polygon_state_stays_bounded_over_a_long_run(tmp_path: Path) -> None:
    """Regions that span five rows of blocks, streamed through 10 and then 40 rows: the
    pieces held open between rows (those reaching the next row) do not grow with the number
    of rows, and nothing is left open at the end."""
    n_short, short = _stream_bars(tmp_path, 10)
    n_long, long = _stream_bars(tmp_path, 40)
    assert n_long > 3 * n_short  # the long run does write its regions
    assert long.rows == 40
    assert long.peak_pieces >= 8  # bars do cross row lines
    assert long.peak_pieces == short.peak_pieces
    assert long.peak_coordinates == short.peak_coordinates
    assert long.pieces == 0


def test_block_stats_are_the_pixel_sums_of_each_piece() -> None:
    """block_pieces labels and sums a block a few rows at a time (trace.STAT_ROWS): each
    piece's sums and counts equal those of the pixels its own polygon covers, on a block
    several chunks tall with NaN pockets and invalid pixels, at an offset in the scene."""
    from geovae.vector import trace

    rng = np.random.default_rng(5)
    h, w = 2 * trace.STAT_ROWS + 37, 90
    classes = rng.integers(0, 4, size=(h // 6 + 1, w // 5 + 1)).repeat(6, 0).repeat(5, 1)[:h, :w].astype(np.uint8)
    valid = np.ones((h, w), dtype=bool)
    valid[40:60, 10:30] = False
    conf = rng.random((h, w)).astype(np.float32)
    conf[100:140, 50:70] = np.nan
    unc = rng.random((h, w)).astype(np.float32)
    win = rasterio.windows.Window(1000, 3000, w, h)
    geoms, cls, stats = trace.block_pieces(classes, valid, win, 4, conf, unc)
    assert len(geoms) > 50 and stats.shape == (len(geoms), trace.NSTATS)
    ids = rasterio.features.rasterize(
        ((g, i + 1) for i, g in enumerate(geoms)),
        out_shape=(h, w),
        transform=Affine.translation(1000, 3000),
        dtype="int32",
    )
    assert (ids[valid] > 0).all() and (ids[~valid] == 0).all()
    for i in range(len(geoms)):
        inside = ids == i + 1
        assert (classes[inside] == cls[i]).all()
        for k, band in ((0, conf), (2, unc)):
            vals = band[inside][np.isfinite(band[inside])].astype(np.float64)
            assert stats[i, k + 1] == len(vals)
            assert stats[i, k] == pytest.approx(vals.sum(), rel=1e-12, abs=1e-12)
    assert (stats[:, 4:] == 0).all()
