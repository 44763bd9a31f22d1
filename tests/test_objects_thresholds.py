"""Object settings learnt on held-out data: the seed threshold and minimum object size that
training chooses by object F1, their place in the model file, and how ``segment --objects``
uses them (learnt values unless an option is given, today's defaults without them).

Fast and offline: hand-made rasters with a known answer, a tiny untrained model, and the
committed Amsterdam fixture raster (256 x 256, EPSG:32631, 10 m).
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from conftest import fixture_path, register_classes
from rasterio.transform import from_origin

from geovae.cli import main
from geovae.model.base import ModelInfo
from geovae.model.io import read_model_info, save_model
from geovae.model.vae import VAESegmenter
from geovae.objects import DEFAULT_SEED, learnt_settings

NDVI = ("ndvi_parcels_amsterdam", "ndvi_from_parcels.tif")
TRANSFORM = from_origin(600000.0, 5800000.0, 10.0, 10.0)
#: Rows and columns of three parcels side by side, touching, and of a small spurious one.
ROWS = (4, 28)
PARCELS = ((4, 16), (16, 28), (28, 40))
SPURIOUS = ((30, 32), (44, 46))


@pytest.fixture
def touching(tmp_path: Path) -> tuple[Path, Path, gpd.GeoDataFrame]:
    """A class raster and object-probability raster of three touching parcels whose seeds
    only one threshold of the candidates separates, plus a 2 x 2 px spurious parcel.

    Interior pixels: parcel 0.60, boundary 0.15 (interior minus boundary 0.45); the two
    pixel columns along each shared edge: parcel 0.55, boundary 0.20 (0.35). A seed
    threshold of 0.3 or less keeps those columns, so the three seeds join into one; 0.5 or
    more keeps no pixel, so the three parcels are one seedless piece, one object. Only 0.4
    seeds each parcel alone. Every parcel pixel is the parcel class (the boundary is weak).
    """
    from geovae.objects import probability_tags
    from geovae.products import write_class_table

    h, w = 36, 52
    cls = np.zeros((h, w), np.uint8)
    parcel = np.full((h, w), 0.05, np.float32)
    boundary = np.full((h, w), 0.05, np.float32)
    r0, r1 = ROWS
    for c0, c1 in PARCELS:
        cls[r0:r1, c0:c1] = 1
        parcel[r0:r1, c0:c1], boundary[r0:r1, c0:c1] = 0.60, 0.15
    for edge in (PARCELS[0][1], PARCELS[1][1]):
        parcel[r0:r1, edge - 1 : edge + 1], boundary[r0:r1, edge - 1 : edge + 1] = 0.55, 0.20
    (sr0, sr1), (sc0, sc1) = SPURIOUS
    cls[sr0:sr1, sc0:sc1] = 1
    parcel[sr0:sr1, sc0:sc1], boundary[sr0:sr1, sc0:sc1] = 0.60, 0.15
    profile = dict(driver="GTiff", width=w, height=h, count=1, crs="EPSG:32631", transform=TRANSFORM)
    classes = tmp_path / "t.classes.tif"
    with rasterio.open(classes, "w", dtype="uint8", nodata=255, **profile) as dst:
        dst.write(cls, 1)
        write_class_table(dst, [0, 1, 2], ["background", "parcel", "boundary"], [(200,) * 3, (0, 150, 0), (0,) * 3])
    probs = tmp_path / "t.object-probability.tif"
    with rasterio.open(probs, "w", dtype="float32", nodata=float("nan"), **{**profile, "count": 2}) as dst:
        dst.write(np.stack([parcel, boundary]))
        dst.update_tags(**probability_tags([1], ["parcel"], 2))

    def box(c0: int, c1: int) -> shapely.Polygon:
        x0, y0 = TRANSFORM @ (c0, r1)
        x1, y1 = TRANSFORM @ (c1, r0)
        return shapely.box(x0, y0, x1, y1)

    reference = gpd.GeoDataFrame({"kind": ["parcel"] * 3}, geometry=[box(*p) for p in PARCELS], crs="EPSG:32631")
    return classes, probs, reference


def test_the_seed_chosen_is_the_only_one_that_splits_touching_parcels(
    touching: tuple[Path, Path, gpd.GeoDataFrame],
) -> None:
    from geovae.training.thresholds import choose_object_settings

    classes, probs, reference = touching
    got = choose_object_settings(classes, probs, reference, ["parcel"])
    f1 = {(s, a): v for s, a, v in got["scores"]}
    assert got["seed"] == 0.4
    # 3 parcels found, 1 spurious object of 4 px: 8 px is the smallest minimum that drops it.
    assert got["min_area_px"] == 8
    assert got["f1_heldout"] == 1.0
    assert f1[(0.4, 0.0)] == pytest.approx(2 * 0.75 / 1.75, abs=1e-4)
    assert f1[(0.3, 8.0)] == 0.0  # one seed: the three parcels merged
    assert f1[(0.5, 8.0)] == 0.0  # no seed: one seedless piece, one object
    assert got["f1_default"] == 0.0  # seed 0.5, no minimum
    assert got["reference_objects"] == 3


def test_learnt_settings_round_trip_through_the_model_file(tmp_path: Path) -> None:
    learnt = {"seed": 0.4, "min_area_px": 8.0, "f1_heldout": 0.61}
    p = save_model(tmp_path / "m.safetensors", _module(), _info(learnt))
    info = read_model_info(p)
    assert learnt_settings(info) == learnt
    assert info.extra["objects"]["heldout"] == {"box": [1.0, 2.0, 3.0, 4.0], "window": [0, 0, 8, 8]}
    assert learnt_settings(read_model_info(save_model(tmp_path / "n.safetensors", _module(), _info(None)))) == {}


def test_learnt_settings_out_of_range_are_not_used() -> None:
    assert learnt_settings(_info({"seed": 1.5, "min_area_px": -1, "f1_heldout": 0.2})) == {}
    assert learnt_settings(_info({"seed": True, "min_area_px": 4})) == {"min_area_px": 4.0}


def _module() -> VAESegmenter:
    torch.manual_seed(0)
    return VAESegmenter(1, 3, base_channels=8, depth=2, latent_channels=4).eval()


def _info(learnt: dict[str, float] | None) -> ModelInfo:
    objects: dict[str, object] = {"boundary_class": 2, "background_class": 0, "object_classes": [1]}
    if learnt is not None:
        objects.update(learnt, heldout={"box": [1.0, 2.0, 3.0, 4.0], "window": [0, 0, 8, 8]})
    return ModelInfo(
        in_channels=1,
        num_classes=3,
        class_ids=[0, 1, 2],
        class_names=["background", "parcel", "boundary"],
        mean=[0.4],
        std=[0.3],
        tile_size=64,
        extra={"objects": objects},
    )


@pytest.mark.parametrize(
    ("learnt", "options", "seed", "min_area", "origin"),
    [
        ({"seed": 0.3, "min_area_px": 8.0}, (), 0.3, 800.0, {"seed": "model", "min_area": "model"}),
        (
            {"seed": 0.3, "min_area_px": 8.0},
            ("--object-seed", "0.7", "--object-min-area", "0"),
            0.7,
            0.0,
            {"seed": "option", "min_area": "option"},
        ),
        (
            {"seed": 0.3, "min_area_px": 8.0},
            ("--object-seed", "0.6"),
            0.6,
            800.0,
            {"seed": "option", "min_area": "model"},
        ),
        (None, (), DEFAULT_SEED, 0.0, {"seed": "default", "min_area": "default"}),
    ],
    ids=["learnt", "options-win", "one-option", "no-learnt-values"],
)
def test_segment_objects_uses_learnt_settings_unless_options_are_given(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    learnt: dict[str, float] | None,
    options: tuple[str, ...],
    seed: float,
    min_area: float,
    origin: dict[str, str],
) -> None:
    import geovae.vector

    model = save_model(tmp_path / "m.safetensors", _module(), _info(learnt))
    out = tmp_path / "out"
    given: list[float] = []
    write_objects = geovae.vector.write_objects

    def spy(*args: object, **kwargs: object) -> object:
        given.append(float(kwargs["min_area"]))  # type: ignore[arg-type]
        return write_objects(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(geovae.vector, "write_objects", spy)
    args = ["-q", "segment", str(fixture_path(*NDVI)), "-m", str(model), "-o", str(out), "--objects", "parcel"]
    code = main([*args, "--formats", "gpkg", "--no-quicklook", "--device", "cpu", *options])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "ndvi_from_parcels.json").read_text())["objects"]
    assert report["seed"] == seed
    assert report["min_area"] == min_area
    assert report["settings_from"] == origin
    assert given == [min_area]  # what the object pass dropped objects below


def test_segment_object_options_are_checked() -> None:
    from geovae.errors import OptionError
    from geovae.segment import SegmentOptions

    with pytest.raises(OptionError, match="--object-min-area"):
        SegmentOptions(object_min_area=float("nan"))
    assert SegmentOptions().object_seed is None and SegmentOptions().object_min_area is None


def test_a_learnt_minimum_drops_the_small_objects_of_the_object_pass(
    touching: tuple[Path, Path, gpd.GeoDataFrame], tmp_path: Path
) -> None:
    from geovae.objects import ObjectSpec
    from geovae.vector import write_objects

    classes, probs, _ = touching
    counts = []
    for spec in (
        ObjectSpec(classes=(1,), boundary=2, seed=0.4),
        ObjectSpec(classes=(1,), boundary=2, seed=0.4, min_pixels=8),
    ):
        out = tmp_path / f"o{spec.min_pixels:g}.gpkg"
        write_objects(classes, [(out, out)], spec, probabilities=probs, min_area=spec.min_object_area(0.0, 100.0))
        counts.append(len(gpd.read_file(out, layer="objects")))
    assert counts == [4, 3]  # the 4-pixel spurious object goes, the three parcels stay


@pytest.mark.parametrize("val_fraction", [0.4, 0.25])
def test_training_chooses_on_the_held_out_part_and_records_the_choice(
    tmp_path: Path, val_fraction: float, caplog: pytest.LogCaptureFixture
) -> None:
    """The choice made after training (an untrained model here: the wiring, not the skill):
    on the held-out east part, against the parcels there; none when it holds no parcel
    (the fixture's parcels stop 64 px short of every side)."""
    from geovae.training import SceneDataModule
    from geovae.training.thresholds import MIN_AREA_CANDIDATES_PX, SEED_CANDIDATES, learn_object_settings

    parcels = gpd.read_file(fixture_path("ndvi_parcels_amsterdam", "parcels_brp2020.fgb")).assign(kind="parcel")
    path = tmp_path / "p.gpkg"
    parcels[["kind", "geometry"]].to_file(path)
    dm = SceneDataModule(
        str(fixture_path(*NDVI)),
        vector_labels=str(path),
        label_field="kind",
        boundary_width=1,
        val_fraction=val_fraction,
    )
    info = _info(None)
    with caplog.at_level("INFO", logger="geovae"):
        learn_object_settings(_module(), info, dm)
    got = info.extra["objects"]
    if val_fraction == 0.25:
        assert "seed" not in got and any(
            "no labelled object in the held-out part" in r.getMessage() for r in caplog.records
        )
        return
    width = round(256 * val_fraction)
    assert got["heldout"]["window"] == [256 - width, 0, width, 256]
    assert got["heldout"]["box"] == pytest.approx(list(dm.val_box))
    assert got["reference_objects"] == int(parcels.clip(shapely.box(*dm.val_box)).area.gt(0).sum())
    assert got["seed"] in SEED_CANDIDATES and got["min_area_px"] in MIN_AREA_CANDIDATES_PX
    assert 0.0 <= got["f1_default"] <= got["f1_heldout"] <= 1.0
    assert learnt_settings(info)["seed"] == got["seed"]


def test_a_label_raster_with_a_boundary_class_is_object_labels_too(tmp_path: Path) -> None:
    """Labels as a raster (0 unlabelled, 1 parcel, 2 boundary, 3 background) made from the
    fixture's parcels: the reference objects are the ones the labels themselves make."""
    from geovae.training import SceneDataModule
    from geovae.training.thresholds import learn_object_settings, raster_object_classes

    parcels = gpd.read_file(fixture_path("ndvi_parcels_amsterdam", "parcels_brp2020.fgb"))
    with rasterio.open(fixture_path(*NDVI)) as src:
        profile = src.profile
    cls = register_classes(parcels, profile, 3)
    labels = tmp_path / "labels.tif"
    with rasterio.open(labels, "w", **{**profile, "dtype": "uint8", "nodata": 0}) as dst:
        dst.write(cls, 1)
    dm = SceneDataModule(
        str(fixture_path(*NDVI)), str(labels), classes="1:parcel,2:boundary,3:background", val_fraction=0.4
    )
    assert raster_object_classes(dm) == (2, [1])
    info = _info(None)
    info.class_ids, info.class_names, info.extra = [1, 2, 3], ["parcel", "boundary", "background"], {}
    learn_object_settings(_module(), info, dm)
    got = info.extra["objects"]
    assert got["heldout"]["window"] == [154, 0, 102, 256]
    # the parcels of the held-out part, each an object of the labels (narrow ones are all boundary)
    assert 5 <= got["reference_objects"] <= int(parcels.clip(shapely.box(*dm.val_box)).area.gt(0).sum())
    assert learnt_settings(info)["seed"] == got["seed"]


def test_labels_smaller_than_a_tile_in_the_training_part_are_one_clear_error(tmp_path: Path) -> None:
    """Half the fixture held out: the parcels (which stop 64 px short of every side) cover
    less than one 64-px tile of the west half; TorchGeo's sampler would fail with no hint."""
    from geovae.errors import OptionError
    from geovae.training import train_model

    parcels = gpd.read_file(fixture_path("ndvi_parcels_amsterdam", "parcels_brp2020.fgb")).assign(kind="parcel")
    path = tmp_path / "p.gpkg"
    parcels[["kind", "geometry"]].to_file(path)
    with pytest.raises(OptionError, match="cover less than one 64 x 64 px tile of the training part"):
        train_model(
            str(fixture_path(*NDVI)),
            vector_labels=str(path),
            label_field="kind",
            boundary_width=1,
            out=tmp_path / "m.safetensors",
            epochs=1,
            tile=64,
            val_fraction=0.5,
            device="cpu",
            progress=False,
        )
    assert not (tmp_path / "m.safetensors").exists()
