"""Objects kept apart: boundary labels for training, objects from a watershed along the
boundary class, block-wise and exact across block lines, object metrics.

Real data: parcels of the Dutch crop-parcel register (many share an edge or lie 1-2 px apart)
and the SpaceNet Atlanta building footprints. The fast tests use the committed fixtures (82
register parcels on a synthetic NDVI raster laid on the real grid, the whole Atlanta tile's mask
and footprints); the slow training test reads the whole Amsterdam NDVI scene and register from
the real-data folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from conftest import data_path, fixture_path, register_classes
from scipy import ndimage as ndi

from geovae.errors import LabelsError, OptionError

AMS = "ndvi_parcels_amsterdam"
PARCELS = (AMS, "parcels_brp2020.gpkg")
NDVI = (AMS, "NDVI.tif")
CROSS = ndi.generate_binary_structure(2, 1)


@pytest.fixture
def ndvi() -> Path:
    """A 256 x 256 float32 raster on the real NDVI grid (EPSG:32631, 10 m) around the fixture's parcels."""
    return fixture_path(AMS, "ndvi_from_parcels.tif")


@pytest.fixture
def parcels() -> gpd.GeoDataFrame:
    """82 real register parcels inside the fixture raster (their extent is 640 m short of every side)."""
    return gpd.read_file(fixture_path(AMS, "parcels_brp2020.fgb"))


def _write(gdf: gpd.GeoDataFrame, path: Path) -> Path:
    gdf.to_file(path, layer="parcels")
    return path


# ----------------------------------------------------------------------------- training labels
def test_object_mask_puts_a_boundary_on_both_sides_of_a_shared_edge() -> None:
    from geovae.training.labels import UNLABELLED, object_mask

    ids = np.zeros((6, 9), np.int64)
    ids[1:5, 1:4] = 1  # two objects of class 7 sharing the edge between columns 3 and 4
    ids[1:5, 4:7] = 2
    ids[1:5, 7] = 3  # a one-pixel-wide object of class 0 (no class): unlabelled, still an outline
    bg = np.ones(ids.shape, bool)
    bg[:, 8] = False  # outside the labelled area
    m = object_mask(ids, np.array([0, 7, 7, 0]), 1, 9, bg, 0)
    expect = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, -1],
            [0, 9, 9, 9, 9, 9, 9, 9, -1],
            [0, 9, 7, 9, 9, 7, 9, 9, -1],
            [0, 9, 7, 9, 9, 7, 9, 9, -1],
            [0, 9, 9, 9, 9, 9, 9, 9, -1],
            [0, 0, 0, 0, 0, 0, 0, 0, -1],
        ]
    )
    assert UNLABELLED == -1
    np.testing.assert_array_equal(m, expect)
    # Two pixels wide: the interiors shrink by two on every side.
    m2 = object_mask(ids, np.array([0, 7, 7, 0]), 2, 9, None, None)
    assert not (m2 == 7).any() and (m2[ids > 0] == 9).all() and (m2[ids == 0] == UNLABELLED).all()


def test_touching_parcels_are_rasterised_with_a_boundary_between_them(
    ndvi: Path, parcels: gpd.GeoDataFrame, tmp_path: Path
) -> None:
    from geovae.training import SceneDataModule
    from geovae.training.labels import object_mask

    # The register's parcels in the west of the raster, one class: the labels cover only part
    # of the image, so "background" must stop at their extent.
    left, bottom, _right, top = parcels.total_bounds
    box = shapely.box(left, bottom, left + 880, top)
    sub = parcels[parcels.geometry.within(box)].reset_index(drop=True)
    sub["kind"] = "parcel"
    path = _write(sub[["kind", "geometry"]], tmp_path / "parcels.gpkg")
    dm = SceneDataModule(
        str(ndvi),
        vector_labels=str(path),
        label_field="kind",
        boundary_width=1,
        tile=64,
        val_fraction=0.25,
        val_side="south",
    )
    assert dm.classes.names == ["background", "parcel", "boundary"] and dm.classes.ids == [0, 1, 2]
    assert dm.objects == {
        "boundary_class": 2,
        "background_class": 0,
        "object_classes": [1],
        "boundary_width": 1,
        "background": "extent",
    }
    assert dm.describe()["objects"] == dm.objects
    counts = dm.train_class_counts
    assert all(counts[c] > 1000 for c in (0, 1, 2))

    # Two parcels that share an edge.
    geoms = sub.geometry.values
    i, j = shapely.STRtree(geoms).query(geoms, predicate="touches")
    shared = [(a, b) for a, b in zip(i, j) if a < b and shapely.length(shapely.intersection(geoms[a], geoms[b])) > 50]
    assert shared, "the register has parcels that share an edge"
    a, b = shared[0]
    left, bottom, right, top = shapely.union(geoms[a], geoms[b]).bounds
    # A window on the image's pixel grid around both, 10 px of margin.
    x0, y1 = np.floor(left / 10) * 10 - 100, np.ceil(top / 10) * 10 + 100
    x1, y0 = np.ceil(right / 10) * 10 + 100, np.floor(bottom / 10) * 10 - 100
    dm.setup("fit")
    sample = dm.train_dataset[x0:x1, y0:y1, :]  # type: ignore[misc]
    mask = sample["mask"].numpy()
    h, w = mask.shape
    t = rasterio.transform.from_origin(x0, y1, 10, 10)
    ids = rasterio.features.rasterize(
        [(g, k + 1) for k, g in enumerate(geoms)], out_shape=(h, w), transform=t, dtype="int32"
    )
    # Channel indices: background 0, parcel 1, boundary 2, ignore -100.
    pa, pb = (ids == a + 1), (ids == b + 1)
    assert pa.sum() > 20 and pb.sum() > 20
    touching = pa & ndi.binary_dilation(pb, CROSS)
    assert touching.sum() >= 3 and (mask[touching] == 2).all()  # A's side of the shared edge
    assert (mask[pb & ndi.binary_dilation(pa, CROSS)] == 2).all()  # and B's
    interior = mask == 1
    lab, _ = ndi.label(interior, CROSS)
    la, lb = set(np.unique(lab[pa & interior])) - {0}, set(np.unique(lab[pb & interior])) - {0}
    assert la and lb and not la & lb  # the two interiors are not connected
    # Inside the labels' extent (pixel centres 10 m in from it), outside every parcel: background.
    ex0, ey0, ex1, ey1 = sub.total_bounds
    cx, cy = x0 + 5 + 10 * np.arange(w), y1 - 5 - 10 * np.arange(h)
    in_extent = ((cy > ey0 + 10) & (cy < ey1 - 10))[:, None] & ((cx > ex0 + 10) & (cx < ex1 - 10))[None, :]
    assert (ids == 0)[in_extent].sum() > 100 and (mask[(ids == 0) & in_extent] == 0).all()
    # The same classes as rasterising the whole window at once (the patch edge is no outline),
    # inside the labels' extent.
    full = object_mask(ids.astype(np.int64), np.array([0] + [1] * len(geoms)), 1, 2, np.ones((h, w), bool), 0)
    inner = np.zeros((h, w), bool)
    inner[1:-1, 1:-1] = True
    np.testing.assert_array_equal(mask[inner & in_extent], full[inner & in_extent])

    # Outside the labels' extent nothing is background: unlabelled. A patch across its east
    # edge, in the middle of its rows (the training part, north of the validation quarter):
    xs = np.floor(ex1 / 10) * 10 - 320
    ys = np.floor((ey0 + ey1) / 20) * 10 - 320
    assert ys > dm.val_box[3] and ys + 640 < ey1  # type: ignore[index]
    edge = dm.train_dataset[xs : xs + 640, ys : ys + 640, :]  # type: ignore[misc]
    m = edge["mask"].numpy()
    centres = xs + 5 + 10 * np.arange(m.shape[1])
    assert (m[:, centres > ex1] == -100).all() and (m[:, centres < ex1 - 10] != -100).all()


def test_object_label_options_are_checked(ndvi: Path, parcels: gpd.GeoDataFrame, tmp_path: Path) -> None:
    from geovae.training import SceneDataModule

    sub = parcels.iloc[:50].copy()
    path = _write(sub, tmp_path / "p.gpkg")
    with pytest.raises(OptionError, match=r"--boundary-width .* whole number"):
        SceneDataModule(str(ndvi), vector_labels=str(path), label_field="category", boundary_width=0)
    with pytest.raises(OptionError, match="--background applies to object labels"):
        SceneDataModule(str(ndvi), vector_labels=str(path), label_field="category", background="none")
    with pytest.raises(OptionError, match="needs object polygons"):
        SceneDataModule(str(ndvi), labels=str(ndvi), boundary_width=1)
    sub["kind"] = "boundary"
    path2 = _write(sub, tmp_path / "q.gpkg")
    with pytest.raises(LabelsError, match="named 'boundary'"):
        SceneDataModule(str(ndvi), vector_labels=str(path2), label_field="kind", boundary_width=1)
    # background "none": no background class; a vector file: the area it covers.
    dm = SceneDataModule(
        str(ndvi), vector_labels=str(path), label_field="category", boundary_width=2, background="none", val_fraction=0
    )
    assert "background" not in dm.classes.names and dm.objects["background_class"] is None
    area = gpd.GeoDataFrame(geometry=[shapely.box(*sub.total_bounds).buffer(-200)], crs=sub.crs)
    area.to_file(tmp_path / "area.gpkg")
    dm = SceneDataModule(
        str(ndvi),
        vector_labels=str(path),
        label_field="category",
        boundary_width=1,
        background=str(tmp_path / "area.gpkg"),
        val_fraction=0,
    )
    assert dm.classes.names[0] == "background" and dm.objects["background"] == str(tmp_path / "area.gpkg")


# ----------------------------------------------------------------------------- the split
def _touching_pair(parcels: gpd.GeoDataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two register parcels that share a long edge, rasterised on the NDVI grid around them:
    (object ids, pixels of A, pixels of B)."""
    from geovae.training.labels import object_mask

    geoms = parcels.geometry.values
    i, j = shapely.STRtree(geoms).query(geoms, predicate="touches")
    keep = i < j
    i, j = i[keep], j[keep]
    lengths = shapely.length(shapely.intersection(geoms[i], geoms[j]))
    for k in np.argsort(-lengths):  # the longest shared edge between two parcels with interiors
        a, b = i[k], j[k]
        left, bottom, right, top = shapely.union(geoms[a], geoms[b]).bounds
        x0, y1 = np.floor(left / 10) * 10 - 100, np.ceil(top / 10) * 10 + 100
        w, h = int((np.ceil(right / 10) * 10 + 100 - x0) / 10), int((y1 - np.floor(bottom / 10) * 10 + 100) / 10)
        if w * h > 200 * 200:
            continue
        t = rasterio.transform.from_origin(x0, y1, 10, 10)
        ids = rasterio.features.rasterize([(geoms[a], 1), (geoms[b], 2)], out_shape=(h, w), transform=t, dtype="int32")
        cls = object_mask(ids.astype(np.int64), np.array([0, 1, 1]), 1, 2, np.ones((h, w), bool), 0)
        inner = cls == 1
        if (inner & (ids == 1)).sum() >= 40 and (inner & (ids == 2)).sum() >= 40:
            return cls, ids == 1, ids == 2
    raise AssertionError("no two parcels with interiors share an edge")


@pytest.mark.parametrize("gap", ["weak", "broken"])
def test_watershed_splits_two_parcels_joined_by_a_broken_boundary(parcels: gpd.GeoDataFrame, gap: str) -> None:
    """Two real parcels that share an edge, predicted perfectly except around the middle of
    their shared boundary: there it is weak (boundary probability 0.35, below the parcel's
    0.6) or missing altogether. Class regions merge the two; objects split them again along
    the ridge, boundary pixels given back, as they do with the boundary intact."""
    from geovae.objects import ObjectSpec, label_objects

    cls, pa, pb = _touching_pair(parcels)
    spec = ObjectSpec((1,), ("parcel",), 2)
    valid = np.ones(cls.shape, bool)
    probs = np.stack([(cls == 1), (cls == 2)]).astype(np.float32)
    intact, _, _ = label_objects(cls, valid, spec, probs)
    edge = (pa & ndi.binary_dilation(pb, CROSS)) | (pb & ndi.binary_dilation(pa, CROSS))
    rows, cols = np.nonzero(edge)
    k = np.argmin(np.hypot(rows - rows.mean(), cols - cols.mean()))  # the edge pixel nearest its middle
    radius = 3 if gap == "weak" else 2
    rr, cc = np.indices(cls.shape)
    hole = edge & (np.hypot(rr - rows[k], cc - cols[k]) <= radius)
    assert hole.sum() >= 3
    cls, probs = cls.copy(), probs.copy()
    cls[hole] = 1  # the gap is "parcel" to the class raster
    probs[0, hole], probs[1, hole] = (0.6, 0.35) if gap == "weak" else (1.0, 0.0)
    interior = cls == 1
    lab, _ = ndi.label(interior, CROSS)
    assert len(set(np.unique(lab[pa & interior])) & set(np.unique(lab[pb & interior])) - {0}) == 1  # regions merge
    labels, _, label_class = label_objects(cls, valid, spec, probs)
    assert (label_class == 1).all()
    for truth in (pa, pb):
        obj, ref = labels == np.bincount(labels[truth]).argmax(), intact == np.bincount(intact[truth]).argmax()
        assert (obj & ref).sum() / (obj | ref).sum() >= 0.95  # the same object as with the boundary intact
        assert (ref & truth).sum() / (ref | truth).sum() >= 0.85  # ...which is the parcel
    assert np.bincount(labels[pa]).argmax() != np.bincount(labels[pb]).argmax()
    assert (labels[pa | pb] > 0).all()  # boundary pixels given back


# ----------------------------------------------------------------------------- objects, block-wise
@pytest.fixture
def register_rasters(ndvi: Path, parcels: gpd.GeoDataFrame, tmp_path: Path) -> tuple[Path, Path]:
    """A class raster and an object-probability raster made from the parcel register itself
    (a perfect prediction: background 0, parcel 1, boundary 2 one pixel wide)."""
    from geovae.objects import probability_tags
    from geovae.products import write_class_table

    with rasterio.open(ndvi) as src:
        profile = src.profile
    cls = register_classes(parcels, profile, 0)
    profile.update(dtype="uint8", nodata=255, tiled=True, blockxsize=256, blockysize=256)
    classes = tmp_path / "register.classes.tif"
    with rasterio.open(classes, "w", **profile) as dst:
        dst.write(cls, 1)
        write_class_table(
            dst, [0, 1, 2], ["background", "parcel", "boundary"], [(200, 200, 200), (0, 150, 0), (0, 0, 0)]
        )
    profile.update(dtype="float32", nodata=float("nan"), count=2)
    probs = tmp_path / "register.object-probability.tif"
    with rasterio.open(probs, "w", **profile) as dst:
        dst.write(np.stack([cls == 1, cls == 2]).astype("float32"))
        dst.update_tags(**probability_tags([1], ["parcel"], 2))
    return classes, probs


def test_objects_are_the_same_whatever_the_block_size(
    register_rasters: tuple[Path, Path], parcels: gpd.GeoDataFrame, tmp_path: Path
) -> None:
    from geovae.vector import vectorize_objects

    classes, probs = register_rasters
    with rasterio.open(classes) as ds:
        size, left = ds.width, ds.bounds.left
    runs = {}
    for block in (size, 128, 48):
        out = tmp_path / f"o{block}.gpkg"
        res = vectorize_objects(classes, out, objects="parcel", probabilities=probs, block_size=block, halo=128)
        assert res.beyond_halo == 0
        runs[block] = gpd.read_file(out, layer="register_objects").set_index("object_id").sort_index()
    ref = runs[size]
    # Most parcels are an object of their own: 57 of the 82 (the narrow ones, one or two 10 m
    # pixels wide, are all boundary).
    assert len(ref) > 0.6 * len(parcels) and ref.index.is_unique
    for block in (128, 48):
        g = runs[block]
        assert list(g.index) == list(ref.index)  # the same objects, named alike, none twice
        assert shapely.equals(g.geometry.values, ref.geometry.values).all()  # never cut at a block line
        np.testing.assert_allclose(g["score"], ref["score"], rtol=1e-9)
    # Objects that span several 48-pixel blocks came out whole, once.
    x0, _y0, x1, _y1 = shapely.bounds(ref.geometry.values).T
    spans = np.floor((x1 - left - 1e-6) / 480) != np.floor((x0 - left) / 480)
    assert spans.sum() > 0.1 * len(ref)
    # Objects tile the parcel and boundary pixels they cover: no overlaps.
    union = shapely.union_all(ref.geometry.values)
    assert union.area == pytest.approx(ref.geometry.area.sum(), rel=1e-9)
    assert (ref.class_name == "parcel").all() and (ref.score > 0).all() and ref.confidence_mean.isna().all()


def test_an_object_larger_than_the_halo_is_reported(
    register_rasters: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from geovae.vector import vectorize_objects

    classes, probs = register_rasters
    with caplog.at_level("WARNING", logger="geovae"):
        res = vectorize_objects(classes, tmp_path / "o.gpkg", objects="1", probabilities=probs, block_size=64, halo=4)
    assert res.beyond_halo > 10
    assert any(
        "beyond the 4-pixel object halo" in r.getMessage() and "--object-halo" in r.getMessage() for r in caplog.records
    )


# ----------------------------------------------------------------------------- object metrics
def test_object_scores_on_a_known_pair_of_polygon_sets(tmp_path: Path) -> None:
    from geovae.metrics import match_objects, object_scores

    box = shapely.box
    crs = "EPSG:32631"
    ref = gpd.GeoDataFrame(
        geometry=[box(0, 0, 10, 10), box(10, 0, 20, 10), box(30, 0, 40, 10), box(50, 0, 52, 2)], crs=crs
    )
    pred = gpd.GeoDataFrame(
        {"class_name": ["a", "a", "a", "a", "a", "b"]},
        geometry=[
            box(0, 0, 10, 8),  # A: IoU 0.8
            box(0, 8, 10, 10),  # A's rest: IoU 0.2, a false positive
            box(10, 0, 25, 10),  # B: IoU 100 / 150
            box(30, 0, 35, 10),  # C: IoU exactly 0.5, a match
            box(60, 0, 70, 10),  # nothing: a false positive
            box(0, 0, 10, 10),  # class b: left out with classes=["a"]
        ],
        crs=crs,
    )
    s = object_scores(pred, ref, classes=["a"])
    assert (s["reference"], s["predicted"], s["matched"]) == (4, 5, 3)
    assert s["precision"] == pytest.approx(3 / 5) and s["recall"] == pytest.approx(3 / 4)
    assert s["f1"] == pytest.approx(2 * 3 / 9) and s["mean_iou"] == pytest.approx((0.8 + 2 / 3 + 0.5) / 3)
    # One to one: with class b too, the exact copy of A takes A; box(0, 0, 10, 8) is left over.
    s = object_scores(pred, ref)
    assert (s["predicted"], s["matched"]) == (6, 3) and s["mean_iou"] == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert match_objects([(0.6, 0, 0), (0.9, 0, 1), (0.7, 1, 1)]) == [(0.9, 0, 1)]
    # Clipped to a region: C, D and the far box drop out, B's match is clipped to IoU 1.
    s = object_scores(pred, ref, classes=["a"], region=(0, 0, 20, 10))
    assert (s["reference"], s["predicted"], s["matched"]) == (2, 3, 2) and s["mean_iou"] == pytest.approx(0.9)
    # Stricter threshold, and min area (D is 4 m^2).
    assert object_scores(pred, ref, classes=["a"], iou_threshold=0.75)["matched"] == 1
    assert object_scores(pred, ref, classes=["a"], min_area=5)["reference"] == 3
    # Files in any format, the reference in another CRS.
    pred.to_file(tmp_path / "p.gpkg", layer="p")
    ref.to_crs("EPSG:4326").to_file(tmp_path / "r.geojson")
    # (C's IoU of exactly 0.5 does not survive the round trip through degrees to the last bit.)
    s2 = object_scores(tmp_path / "p.gpkg", tmp_path / "r.geojson", classes=["a"], iou_threshold=0.499)
    assert (
        s2["matched"] == 3
        and s2["f1"] == pytest.approx(2 * 3 / 9)
        and s2["mean_iou"] == pytest.approx((0.8 + 2 / 3 + 0.5) / 3, abs=1e-6)
    )
    with pytest.raises(OptionError, match="IoU threshold"):
        object_scores(pred, ref, iou_threshold=0)


def test_evaluate_objects_of_the_spacenet_footprints(
    atlanta_mask: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Building footprints as objects from the reference mask alone (no probabilities: seeds
    by distance), scored one to one against the 43 SpaceNet footprints through the CLI."""
    import json

    from click.testing import CliRunner

    from geovae.cli import cli, main
    from geovae.metrics import evaluate

    footprints = fixture_path("spacenet_solaris", "original", "geotiff_labels.geojson")
    out = tmp_path / "atlanta.objects.gpkg"
    r = CliRunner().invoke(
        cli, ["vectorize", str(atlanta_mask), "-o", str(out), "--objects", "1", "--block-size", "64"]
    )
    assert r.exit_code == 0, r.output
    d = evaluate(atlanta_mask, objects=footprints, predicted_objects=out)
    o = d["objects"]
    assert "classes" not in d and o["reference"] == 43 and o["f1"] >= 0.95 and o["mean_iou"] >= 0.9
    r = CliRunner().invoke(
        cli, ["evaluate", str(atlanta_mask), "--objects", str(footprints), "--predicted-objects", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["objects"]["f1"] == pytest.approx(o["f1"])
    r = CliRunner().invoke(cli, ["evaluate", str(atlanta_mask)])
    assert r.exit_code != 0 and "--labels" in r.output
    # Bad input is one line naming what is wrong, never a traceback; the reference is checked
    # before the predicted objects are looked for.
    for args, says in (
        (["evaluate", str(atlanta_mask), "--objects", str(tmp_path / "nope.gpkg")], "reference objects"),
        (
            ["evaluate", str(atlanta_mask), "--objects", str(atlanta_mask), "--predicted-objects", str(out)],
            "cannot be read",
        ),
        (
            [
                "vectorize",
                str(atlanta_mask),
                "-o",
                str(tmp_path / "x.gpkg"),
                "--objects",
                "1",
                "--probabilities",
                str(tmp_path / "nope.tif"),
            ],
            "does not exist",
        ),
    ):
        capsys.readouterr()
        code = main(args)
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("geovae: error: ") and says in err and err.count("\n") == 1, err
        assert not (tmp_path / "x.gpkg").exists()


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_short_training_on_parcels_objects_beat_class_regions(tmp_path: Path) -> None:
    """Train a few epochs on the west half of the whole real NDVI scene with object labels,
    segment the east half with --objects, and score both the objects and the plain
    class-region polygons against the register: the objects keep neighbouring parcels apart
    where class regions merge them."""
    from benchmarks.bench_objects import crop  # the benchmark's halves, cut the same way
    from geovae.metrics import evaluate
    from geovae.model.io import read_model_info
    from geovae.objects import boundary_class
    from geovae.segment import segment_scene
    from geovae.training import train_model

    ndvi, parcels = data_path(*NDVI), gpd.read_file(data_path(*PARCELS))
    west, east = crop(ndvi, tmp_path / "west.tif", 0, 500), crop(ndvi, tmp_path / "east.tif", 500, 1000)
    labels = parcels.assign(kind="parcel")[["kind", "geometry"]]
    path = _write(labels, tmp_path / "parcels.gpkg")
    # The architecture the objects are measured with (docs/quality.md). The leaner default
    # (base 16, depth 3) scores objects F1 0.005 vs regions 0.007 at this 3-epoch budget: it
    # has not learnt the boundary class yet, so it would test nothing.
    res = train_model(
        west,
        vector_labels=path,
        label_field="kind",
        boundary_width=1,
        out=tmp_path / "m.safetensors",
        epochs=3,
        tile=64,
        batch_size=16,
        samples_per_epoch=256,
        val_fraction=0,
        device="cpu",
        progress=False,
        base_channels=32,
        depth=4,
    )
    info = read_model_info(res.model_path)
    assert info.class_names == ["background", "parcel", "boundary"] and boundary_class(info) == 2
    assert info.extra["objects"]["boundary_class"] == 2

    def segment(folder: str, **tiling: int) -> Any:
        return segment_scene(
            east,
            res.model_path,
            tmp_path / folder,
            objects=("parcel",),
            formats=("gpkg",),
            quicklook=False,
            progress=False,
            device="cpu",
            **tiling,
        )

    out = segment("out")
    assert {"objects_gpkg", "object_probability"} <= set(out.outputs)
    assert out.report["objects"]["count"] > 100 and out.report["objects"]["beyond_halo"] == 0
    assert out.report["objects"]["seeds_from"] == "distance"  # object labels give the model object heads
    with rasterio.open(out.outputs["object_probability"]) as ds:
        assert ds.count == 4 and ds.descriptions[:2] == ("probability of parcel", "probability of boundary")
    # Another tiling whose overlap still covers the model's halo (which covers the object
    # heads too): the same objects.
    other = segment("other", tile=256, block_size=256)
    layer = "east_objects"
    a = gpd.read_file(out.outputs["objects_gpkg"], layer=layer).set_index("object_id").sort_index()
    b = gpd.read_file(other.outputs["objects_gpkg"], layer=layer).set_index("object_id").sort_index()
    # The two tilings' probabilities differ by rounding (about 1e-6): a pixel whose distance
    # lies that close to the seed threshold can flip, so an object may gain or lose a pixel
    # (1 of 1,323 objects in one of three 20-epoch runs, docs/quality.md); never more.
    assert list(a.index) == list(b.index)
    x, y = a.geometry.values, b.geometry.values
    iou = shapely.area(shapely.intersection(x, y)) / shapely.area(shapely.union(x, y))
    assert iou.min() >= 0.99 and shapely.equals(x, y).mean() >= 0.99
    objs = evaluate(out.outputs["classes"], objects=data_path(*PARCELS))["objects"]
    regions = evaluate(
        out.outputs["classes"],
        objects=data_path(*PARCELS),
        predicted_objects=out.outputs["gpkg"],
        object_classes=["parcel"],
    )["objects"]
    assert objs["reference"] == regions["reference"] > 1900
    # After 3 epochs of 256 patches (seed 0): objects F1 0.080, class regions 0.005; longer
    # runs score higher (docs/quality.md).
    assert objs["f1"] > 3 * regions["f1"] and objs["f1"] > 0.04, (objs, regions)
