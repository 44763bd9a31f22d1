"""Object heads (extent, distance to the outline) and the objects they seed.

Fast and offline: hand-made masks with a known answer, small models, and the committed
Amsterdam fixture raster (256 x 256, EPSG:32631, 10 m).
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
from conftest import batchnorm_statistics, fixture_path
from torch import nn

from geovae.cli import main
from geovae.model.base import ModelInfo
from geovae.model.halo import measure_halo
from geovae.model.io import load_model, read_model_info, save_model
from geovae.model.losses import object_targets, tanimoto_loss
from geovae.model.vae import OBJECT_MAPS, VAESegmenter
from geovae.objects import ObjectSpec, label_objects
from geovae.training.terms import ObjectTerm, Step, build_terms, object_channels

NDVI = ("ndvi_parcels_amsterdam", "ndvi_from_parcels.tif")
BACKGROUND, PARCEL, BOUNDARY = 0, 1, 2


def _two_touching() -> np.ndarray:
    """A mask of two parcels side by side (interiors 10 x 8 and 10 x 12), a one-pixel
    boundary on each side of their shared edge and around them, background outside."""
    m = np.full((16, 28), BACKGROUND, np.int64)
    m[2:14, 2:12] = BOUNDARY
    m[3:13, 3:11] = PARCEL  # interior A: columns 3-10
    m[2:14, 12:26] = BOUNDARY
    m[3:13, 13:25] = PARCEL  # interior B: columns 13-24
    return m


# ----------------------------------------------------------------------------- targets and losses
def test_object_targets_are_the_extent_and_a_distance_normalised_per_object() -> None:
    m = torch.from_numpy(_two_touching())[None]
    extent, dist = object_targets(m, torch.tensor([PARCEL]), BOUNDARY)
    e, d = extent[0].numpy(), dist[0].numpy()
    np.testing.assert_array_equal(e, (_two_touching() != BACKGROUND).astype(np.float32))
    assert (d[_two_touching() != PARCEL] == 0).all()  # boundary and background: 0
    a, b = d[3:13, 3:11], d[3:13, 13:25]
    assert a.max() == pytest.approx(1.0) and b.max() == pytest.approx(1.0)  # each object its own 1
    assert a.min() > 0 and b.min() > 0
    # the pixel next to the boundary is 1 / (the object's largest distance): 1/4 in A (8 wide),
    # 1/5 in B (10 tall, 12 wide)
    assert a[5, 0] == pytest.approx(1 / 4) and b[5, 0] == pytest.approx(1 / 5)
    # unlabelled pixels (ignore) are not interior: they end an object like its outline
    m2 = m.clone()
    m2[0, 3:13, 6] = -100
    _, d2 = object_targets(m2, torch.tensor([PARCEL]), BOUNDARY)
    assert d2[0, 3:13, 6].max() == 0 and d2[0, 3:13, 3:11].max() == pytest.approx(1.0)


def test_tanimoto_loss_is_zero_when_right_one_when_inverted_and_ignores_unweighted_pixels() -> None:
    t = torch.from_numpy((_two_touching() == BOUNDARY).astype(np.float32))
    w = torch.ones_like(t)
    assert float(tanimoto_loss(t, t, w)) == pytest.approx(0.0, abs=1e-6)
    assert float(tanimoto_loss(1 - t, t, w)) == pytest.approx(1.0, abs=1e-6)
    half = torch.full_like(t, 0.5)
    assert 0.3 < float(tanimoto_loss(half, t, w)) < 0.8
    wrong_where_unweighted = torch.where(t > 0, t, torch.ones_like(t))  # wrong on every background pixel
    assert float(tanimoto_loss(wrong_where_unweighted, t, t)) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- the model
def test_object_heads_are_part_of_the_model_and_its_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = VAESegmenter(1, 3, base_channels=8, depth=2, head="lowrank", object_heads=True).eval()
    plain = VAESegmenter(1, 3, base_channels=8, depth=2)
    assert net.has_object_heads and not plain.has_object_heads
    assert net.hparams["object_heads"] is True and "object_heads" not in plain.hparams  # old files unchanged
    x = torch.randn(2, 1, 32, 32)
    logits, rec, maps = net.infer(x, samples=2, reconstruction=True, objects=True)
    assert logits.shape == (2, 2, 3, 32, 32) and rec is not None and maps is not None
    assert maps.shape == (2, len(OBJECT_MAPS), 32, 32)
    assert net.infer(x)[2] is None and plain.infer(x, objects=True)[2] is None
    assert net.forward_all(x).object_maps is not None and plain.forward_all(x).object_maps is None
    info = ModelInfo(1, 3, [0, 1, 2], ["background", "parcel", "boundary"], mean=[0.0], std=[1.0], tile_size=32)
    path = save_model(tmp_path / "m.safetensors", net, info)
    assert read_model_info(path).arch["object_heads"] is True
    model = load_model(path, "cpu")
    assert model.supports_object_maps
    tile = np.random.default_rng(0).normal(size=(1, 1, 32, 32)).astype(np.float32)
    out = model.predict(tile, objects=True)
    with torch.no_grad():
        want = torch.sigmoid(net.infer(torch.from_numpy(tile), objects=True)[2]).numpy()
    np.testing.assert_allclose(out["object_maps"], want, atol=1e-5)
    with pytest.raises(ValueError, match="no object heads"):
        load_model(save_model(tmp_path / "p.safetensors", plain, info), "cpu").predict(
            np.zeros((1, 1, 32, 32), np.float32), objects=True
        )


class _WideMaps(nn.Module):
    """Class logits from each pixel alone (halo 0), object maps from a 9 x 9 mean (halo 4)."""

    has_object_heads = True

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Conv2d(1, 2, 1)
        self.maps = nn.Conv2d(1, 2, 9, padding=4)
        nn.init.constant_(self.maps.weight, 1 / 81)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(x)

    def infer(self, x: torch.Tensor, samples: int = 0, reconstruction: bool = False, objects: bool = False) -> tuple:
        return self.cls(x), None, self.maps(x) if objects else None


def test_the_halo_covers_the_object_maps() -> None:
    m = _WideMaps()
    assert measure_halo(m, 1) >= 4
    m.has_object_heads = False  # type: ignore[misc]
    assert measure_halo(m, 1) == 0


def test_the_object_term_trains_the_heads_and_the_boundary_class() -> None:
    labels = ["background", "parcel", "boundary"]
    assert object_channels(labels) == (2, [1])
    assert object_channels(["water", "forest"]) is None
    hp = {"kl_warmup_steps": 0, "ignore_index": -100, "adversarial": 0, "pseudo_label": 0, "generated_weight": 0}
    assert [type(t) for t in build_terms({**hp, "labels": labels, "object_weight": 1.0})] == [ObjectTerm]
    assert build_terms({**hp, "labels": labels, "object_weight": 0.0}) == []
    torch.manual_seed(0)
    net = VAESegmenter(1, 3, base_channels=8, depth=2, head="lowrank", object_heads=True)
    mask = torch.from_numpy(_two_touching()[:, :16].copy())[None].repeat(2, 1, 1)
    x = torch.randn(2, 1, 16, 16)
    out = net.forward_all(x)
    term = ObjectTerm(1.0, 2, [1], -100)
    step = Step(net, out, x, mask, torch.ones_like(mask, dtype=torch.bool), {}, 0, None)
    res = term(step)
    assert res is not None
    loss, logged = res
    assert set(logged) == {"extent", "distance", "boundary"} and torch.isfinite(loss)
    loss.backward()
    assert net.object_head is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.object_head.parameters())
    assert net.head.out.weight.grad is not None and net.head.out.weight.grad.abs().sum() > 0  # the boundary loss
    unlabelled = Step(net, out, x, torch.full_like(mask, -100), torch.ones_like(mask, dtype=torch.bool), {}, 0, None)
    assert term(unlabelled) is None


# ----------------------------------------------------------------------------- objects from the distance map
def test_distance_seeds_split_two_parcels_that_the_class_raster_joins() -> None:
    """Two touching parcels with no boundary predicted between them (one region of the
    parcel class, parcel probability 0.9 everywhere): interior seeds make one object, the
    distance map's two peaks make two, each the parcel."""
    truth = _two_touching()
    cls = np.where(truth == BACKGROUND, BACKGROUND, PARCEL)
    cls[2:14, 2:26] = PARCEL
    valid = np.ones(cls.shape, bool)
    _, dist = object_targets(torch.from_numpy(truth)[None], torch.tensor([PARCEL]), BOUNDARY)
    parcel = np.where(cls == PARCEL, 0.9, 0.05).astype(np.float32)
    probs = np.stack([parcel, np.full(cls.shape, 0.05, np.float32), dist[0].numpy()])
    by_interior, _, _ = label_objects(cls, valid, ObjectSpec((PARCEL,), ("parcel",), BOUNDARY), probs[:2])
    assert len(np.unique(by_interior[by_interior > 0])) == 1
    spec = ObjectSpec((PARCEL,), ("parcel",), BOUNDARY, seed=0.5, distance=True)
    labels, anchors, label_class = label_objects(cls, valid, spec, probs)
    assert len(anchors) == 2 and (label_class == PARCEL).all()
    a, b = labels[3:13, 3:11], labels[3:13, 13:25]
    assert len(np.unique(a)) == 1 and len(np.unique(b)) == 1 and a[0, 0] != b[0, 0]


@pytest.fixture(scope="module")
def heads_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained VAE with object heads for the NDVI fixture (BatchNorm statistics of the
    scene, class logits scaled up and centred so that every class occurs)."""
    with rasterio.open(fixture_path(*NDVI)) as src:
        x = src.read(1).astype(np.float32)
    mean, std = float(x.mean()), float(x.std())
    torch.manual_seed(0)
    net = VAESegmenter(1, 3, base_channels=8, depth=2, head="lowrank", object_heads=True)
    xt = torch.from_numpy((x - mean) / std)[None, None]
    with batchnorm_statistics(net):
        net(xt)
        net.infer(xt, objects=True)
    with torch.no_grad():
        # Decisive outputs that vary from pixel to pixel: an untrained head's class logits
        # differ by little and are all equal where its ReLU is off, plateaus on which
        # rounding alone would decide classes and watersheds differently in two tilings.
        net.head.trunk[0].bias += 1.0
        net.head.out.weight *= 30
        net.head.out.bias[:3] -= net(xt).flatten(2).median(-1).values[0]
    info = ModelInfo(1, 3, [0, 1, 2], ["background", "parcel", "boundary"], mean=[mean], std=[std], tile_size=64)
    return save_model(tmp_path_factory.mktemp("heads") / "heads.safetensors", net, info)


def _objects(folder: Path) -> gpd.GeoDataFrame:
    return (
        gpd.read_file(folder / "ndvi_from_parcels.objects.gpkg", layer="ndvi_from_parcels_objects")
        .set_index("object_id")
        .sort_index()
    )


def test_segment_seeds_from_the_distance_map_and_objects_are_the_same_at_any_block_size(
    heads_model: Path, tmp_path: Path
) -> None:
    """`segment --objects` with a model with object heads writes the maps and seeds from the
    distance; `vectorize --objects` of its rasters finds the distance band by its tag and
    gives the same objects at any block size. (This untrained model's objects are larger than
    a small halo; the slow test in test_objects.py checks two tilings of a trained one.)"""
    scene = str(fixture_path(*NDVI))
    args = ["-q", "segment", scene, "-m", str(heads_model), "-o", str(tmp_path / "a"), "--objects", "parcel"]
    assert main([*args, "--object-seed", "0.5", "--formats", "gpkg", "--no-quicklook"]) == 0
    report = json.loads((tmp_path / "a" / "ndvi_from_parcels.json").read_text())["objects"]
    assert report["seeds_from"] == "distance"
    prob = tmp_path / "a" / "ndvi_from_parcels.object-probability.tif"
    with rasterio.open(prob) as ds:
        assert ds.count == 4 and json.loads(ds.tags()["OBJECT_MAPS"]) == list(OBJECT_MAPS)
        assert ds.descriptions[2:] == (
            "object extent (0..1)",
            "distance to the object's outline, normalised per object (0..1)",
        )
        p = ds.read()
    assert np.nanmin(p[2:]) >= 0 and np.nanmax(p[2:]) <= 1
    a = _objects(tmp_path / "a")
    assert len(a) >= 5
    cls = tmp_path / "a" / "ndvi_from_parcels.classes.tif"
    for block in ("512", "64"):
        out = tmp_path / f"v{block}.gpkg"
        vec = ["-q", "vectorize", str(cls), "-o", str(out), "--objects", "parcel", "--probabilities", str(prob)]
        assert main([*vec, "--block-size", block]) == 0
        v = gpd.read_file(out).set_index("object_id").sort_index()
        assert list(v.index) == list(a.index)
        assert shapely.equals(v.geometry.values, a.geometry.values).all()
    # the same rasters without the distance band's tag: interior seeds, other objects
    plain = tmp_path / "plain.tif"
    with rasterio.open(prob) as src:
        profile, data, tags = src.profile, src.read([1, 2]), src.tags()
    with rasterio.open(plain, "w", **{**profile, "count": 2}) as dst:
        dst.write(data)
        dst.update_tags(**{k: v for k, v in tags.items() if k != "OBJECT_MAPS"})
    out = tmp_path / "interior.gpkg"
    vec = ["-q", "vectorize", str(cls), "-o", str(out), "--objects", "parcel", "--probabilities", str(plain)]
    assert main(vec) == 0
    assert len(gpd.read_file(out)) != len(a)


def test_onnx_export_carries_the_object_maps(heads_model: Path, tmp_path: Path) -> None:
    """The exported graph has the `object_maps` output (checked against torch at export), and
    `segment --objects` with the .onnx file writes the same maps and objects."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install geovae[onnx]")
    from geovae.model.onnx import load_onnx

    onnx_path = tmp_path / "heads.onnx"
    assert main(["-q", "export", str(heads_model), "--onnx", "-o", str(onnx_path)]) == 0
    model = load_onnx(onnx_path)
    assert model.supports_object_maps
    scene = str(fixture_path(*NDVI))
    for name, m in (("torch", heads_model), ("onnx", onnx_path)):
        args = ["-q", "segment", scene, "-m", str(m), "-o", str(tmp_path / name), "--objects", "parcel"]
        assert main([*args, "--object-seed", "0.5", "--formats", "gpkg", "--no-quicklook"]) == 0
    with (
        rasterio.open(tmp_path / "torch" / "ndvi_from_parcels.object-probability.tif") as a,
        rasterio.open(tmp_path / "onnx" / "ndvi_from_parcels.object-probability.tif") as b,
    ):
        assert a.count == b.count == 4
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-4)
