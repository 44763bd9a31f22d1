"""segment_scene end to end on the real rasters: georeferencing, seamless tiling, nodata,
errors before any work, remote reading."""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from conftest import NC, batchnorm_statistics, data_path
from rasterio.features import rasterize
from rasterio.transform import from_origin
from rasterio.windows import Window
from torch import nn

from geovae.classes import CLASS_NODATA
from geovae.errors import CorruptSceneError, ModelMismatchError, OptionError, OutputError, SceneError
from geovae.model.base import ModelInfo, SegmentationModel
from geovae.scene import Scene, open_scene
from geovae.segment import segment_scene
from geovae.segment.predict import _predict

QUIET = dict(progress=False, quicklook=False, formats=())


# -- models --------------------------------------------------------------------------------


def _stats(path: Path) -> tuple[list[float], list[float]]:
    s = open_scene(path)
    d, v = s.read(Window(0, 0, s.width, s.height))
    # std floored as geovae.bands does: a constant band (the Las Vegas raster) must still divide
    return d[:, v].mean(1).tolist(), d[:, v].std(1).clip(1e-6).tolist()


def conv_model(
    path: Path, k: int = 5, layers: int = 3, dilation: int = 1, tile: int = 64, seed: int = 0
) -> SegmentationModel:
    """A random fully convolutional net; receptive-field radius ``layers * dilation``."""
    mean, std = _stats(path)
    c = len(mean)
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(
            nn.Conv2d(c if i == 0 else 16, k if i == layers - 1 else 16, 3, padding=dilation, dilation=dilation)
        )
        if i < layers - 1:
            mods.append(nn.ReLU())
    info = ModelInfo(in_channels=c, num_classes=k, mean=mean, std=std, tile_size=tile)
    return SegmentationModel(nn.Sequential(*mods), info, "cpu")


def vae_model(
    path: Path, k: int = 4, depth: int = 2, tile: int = 128, base: int = 8, halo: bool = False, **arch: Any
) -> SegmentationModel:
    """geovae's VAE segmenter, random weights, BatchNorm statistics taken from the scene."""
    from geovae.model.vae import VAESegmenter

    mean, std = _stats(path)
    c = len(mean)
    torch.manual_seed(0)
    net = VAESegmenter(c, k, base_channels=base, depth=depth, **arch)
    s = open_scene(path)
    d, _ = s.read(Window(0, 0, s.width // 2**depth * 2**depth, s.height // 2**depth * 2**depth))
    x = (torch.from_numpy(d) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with batchnorm_statistics(net):
        net(x[None])
    with torch.no_grad():
        # centre each class's logit on its scene median so the random head uses several classes
        logits = net(x[None])
        bias = net.head.out.bias[:k] if arch.get("head") == "lowrank" else net.head[-1].bias
        bias -= logits.flatten(2).median(-1).values[0]
    measured = None
    if halo:
        from geovae.model.halo import measure_halo

        measured = measure_halo(net.to(memory_format=torch.channels_last), c, 2**depth)
    info = ModelInfo(
        in_channels=c,
        num_classes=k,
        mean=mean,
        std=std,
        tile_size=tile,
        stride=2**depth,
        class_ids=list(range(1, k + 1)),
        class_names=[f"c{i}" for i in range(1, k + 1)],
        halo=measured,
    )
    return SegmentationModel(net, info, "cpu")


def untiled(model: SegmentationModel, path: Path) -> np.ndarray:
    """One forward pass over the whole scene (missing values filled with the band means, as the pipeline does)."""
    s = open_scene(path)
    d, v = s.read(Window(0, 0, s.width, s.height))
    s.fill_missing(d, v, np.asarray(model.info.mean, np.float32))
    st = model.info.stride
    # Padded with the band means, as the pipeline pads tiles past the scene: to the stride,
    # and by the model's halo, which the tiled run's last tiles reach past the scene too.
    h = model.info.halo or 0
    mean = torch.tensor(model.info.mean, dtype=torch.float32)[:, None, None]
    x = (
        nn.functional.pad(
            torch.from_numpy(d)[None] - mean, (0, (-(s.width + h)) % st + h, 0, (-(s.height + h)) % st + h)
        )
        + mean
    )
    return model.predict(x)["probs"][0, :, : s.height, : s.width].numpy()


def read(path: Path, band: int | None = 1) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(band)


def _valid(path: Path, nodata: float | None = None) -> np.ndarray:
    s = open_scene(path, nodata=nodata)
    return s.read(Window(0, 0, s.width, s.height))[1]


def _away_from_border(v: np.ndarray, r: int) -> np.ndarray:
    inner = np.zeros_like(v)
    inner[r:-r, r:-r] = True
    return inner & v


# -- georeferencing, nodata, all outputs -----------------------------------------------------


def test_all_outputs_georeferenced_nodata_kept(tmp_path: Path, rgb_byte: Path) -> None:
    model = vae_model(rgb_byte, k=4, depth=2, tile=256, base=4)
    r = segment_scene(
        rgb_byte, model, tmp_path, samples=2, reconstruction=True, formats=("gpkg", "geojson"), progress=False
    )
    out = r.outputs
    assert {
        "classes",
        "confidence",
        "uncertainty",
        "reconstruction_error",
        "gpkg",
        "geojson",
        "quicklook",
        "report",
    } <= set(out)
    valid = _valid(rgb_byte)
    with rasterio.open(rgb_byte) as src:
        for kind in ("classes", "confidence", "uncertainty", "reconstruction_error"):
            with rasterio.open(out[kind]) as ds:
                assert ds.crs == src.crs and ds.transform == src.transform and ds.shape == src.shape, kind
                data = ds.read()
                nod = data == CLASS_NODATA if kind == "classes" else np.isnan(data)
                for band in nod:
                    np.testing.assert_array_equal(band, ~valid)  # nodata exactly where the input is
                # within one 256-px tile: no overview level (test_products checks them on a larger scene)
                assert ds.overviews(1) == [] and ds.block_shapes[0] == (256, 256)
    cls = read(out["classes"])
    assert len(np.unique(cls[valid])) >= 2
    unc = read(out["uncertainty"], None)
    assert np.nanmax(unc[0]) <= np.log(4) + 1e-4 and np.nanmin(unc[1]) >= 0
    # polygons never cover the nodata frame
    gdf = gpd.read_file(out["gpkg"])
    burned = rasterize(
        ((g, 1) for g in gdf.geometry),
        out_shape=valid.shape,
        transform=Affine(*r.report["scene"]["transform"]),
        fill=0,
        dtype="uint8",
    )
    assert not burned[~valid].any() and burned[valid].mean() > 0.999
    gj = gpd.read_file(out["geojson"])
    assert gj.crs.to_epsg() == 4326 and len(gj) == len(gdf)
    # the report: class areas add up to the valid area (UTM: planar, as the polygons' area_m2)
    rep = json.loads(Path(out["report"]).read_text())
    assert sum(c["pixels"] for c in rep["classes"]) == int(valid.sum())
    px_area = abs(Affine(*rep["scene"]["transform"]).determinant)
    assert sum(c["area_m2"] for c in rep["classes"]) == pytest.approx(valid.sum() * px_area, rel=1e-9)
    assert rep["tiles"]["tiles_run"] + rep["tiles"]["tiles_skipped"] == rep["tiles"]["tiles_total"]
    assert rep["options"]["tile"] == 256 and rep["options"]["overlap"] == 64  # model tile, tile // 4
    from PIL import Image

    with Image.open(out["quicklook"]) as im:
        assert max(im.size) <= 1500 and im.size[0] > valid.shape[1]  # the scene at full size plus a legend
    assert not list(tmp_path.glob("*.part"))


def test_parana_nodata_override(tmp_path: Path, parana: Path) -> None:
    """Landsat-8 fill (0, untagged) is nodata in the outputs when --nodata 0 is given."""
    model = conv_model(parana, k=3, layers=1, tile=32)  # tiles small enough that some are all fill
    r = segment_scene(parana, model, tmp_path, nodata=0, block_size=64, **QUIET)
    v = _valid(parana, nodata=0)
    assert (~v).sum() > 5_000  # the scene's fill corner (30 % of the window)
    np.testing.assert_array_equal(read(r.outputs["classes"]) == CLASS_NODATA, ~v)
    assert r.report["tiles"]["tiles_skipped"] > 0 and r.report["options"]["nodata"] == 0


def test_band_gap_at_valid_pixels_gets_the_band_mean(tmp_path: Path, nc_stack: Path) -> None:
    """NC Landsat-7: band 6 is 0 (the nodata value) in a block where bands 1-5 have data.

    Those pixels stay valid (not every band is nodata), and the model sees band 6's mean
    there, not the fill value 0; every measured value reaches it unchanged.
    """
    model = conv_model(nc_stack, k=3, layers=1, tile=256)  # one tile holds the whole 256 x 144 window
    seen: list[torch.Tensor] = []
    model.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    r = segment_scene(nc_stack, model, tmp_path, **QUIET)
    raw = read(nc_stack, None).astype(np.float32)
    v = _valid(nc_stack)
    gap = v & (raw[5] == 0)
    assert gap.sum() > 7_000 and (raw[:5, gap] > 0).all()  # a real gap in band 6 only
    assert not (v & (raw[:5] == 0).any(0)).any()  # bands 1-5 have no such gap
    (x,) = seen
    x = (
        x[0, :, : raw.shape[1], : raw.shape[2]].numpy() * np.asarray(model.info.std, np.float32)[:, None, None]
        + np.asarray(model.info.mean, np.float32)[:, None, None]
    )  # back to pixel values
    np.testing.assert_allclose(x[5, gap], model.info.mean[5], rtol=1e-6)
    np.testing.assert_allclose(x[:, v & ~gap], raw[:, v & ~gap], atol=1e-3)
    np.testing.assert_allclose(x[:5, gap], raw[:5, gap], atol=1e-3)
    np.testing.assert_allclose(
        x[:, ~v], np.broadcast_to(np.asarray(model.info.mean)[:, None], (6, (~v).sum())), rtol=1e-6
    )
    assert (read(r.outputs["classes"])[gap] != CLASS_NODATA).all()  # the gap pixels are still classified


# -- tiling is invisible ---------------------------------------------------------------------


def _tile_lines(n: int, tile: int, overlap: int) -> np.ndarray:
    step = tile - overlap
    lines = set()
    for o in range(0, n, step):
        lines.update({o, o + tile - 1})
    return np.array(sorted(x for x in lines if 0 < x < n - 1))


def test_tiled_equals_untiled_conv_net(tmp_path: Path, nc_stack: Path) -> None:
    """Receptive-field radius 3 <= overlap // 4: the tiled result is one untiled pass."""
    model = conv_model(nc_stack, layers=3)
    ref = untiled(model, nc_stack)
    v = _valid(nc_stack)
    sel = _away_from_border(v, 3)
    # Float rounding (summation order, thread count) may flip a class only where the untiled
    # pass's two best classes are within 1e-4 of each other: every other pixel must agree.
    second, best = np.sort(ref, 0)[-2:]
    tie = best - second < 1e-4
    classes = {}
    for tile, overlap in ((64, 16), (96, 40)):
        r = segment_scene(nc_stack, model, tmp_path / f"t{tile}", tile=tile, overlap=overlap, **QUIET)
        cls = read(r.outputs["classes"])
        conf = read(r.outputs["confidence"])
        assert (cls[sel] == ref.argmax(0)[sel]).mean() >= 0.999
        assert not (sel & ~tie & (cls != ref.argmax(0))).any()
        assert np.abs(conf[sel] - ref.max(0)[sel]).max() < 1e-4
        classes[tile] = cls
    # At the scene's own edge (outside sel) the tilings pad differently: 6 of the window's
    # 34k valid pixels differ there.
    assert (classes[64][v] == classes[96][v]).mean() >= 0.999
    assert not (sel & ~tie & (classes[64] != classes[96])).any()
    assert len(np.unique(classes[64][v])) >= 3


def test_smooth_blending_without_seams(tmp_path: Path, nc_stack: Path) -> None:
    """Receptive-field radius 12 > overlap // 4 (8 and 10): not exact, but the tiles still do not show."""
    model = conv_model(nc_stack, layers=4, dilation=3, seed=1)
    v = _valid(nc_stack)
    res = {}
    for tile, overlap in ((96, 32), (128, 40)):
        r = segment_scene(nc_stack, model, tmp_path / f"t{tile}", tile=tile, overlap=overlap, **QUIET)
        res[tile] = (read(r.outputs["classes"]), read(r.outputs["confidence"]))
    a, b = res[96][0], res[128][0]
    agree = (a[v] == b[v]).mean()
    assert agree >= 0.995
    # no straight seam: along no tile line of either grid is the disagreement concentrated
    diff = (a != b) & v
    for tile, overlap in ((96, 32), (128, 40)):
        for axis, n in ((1, v.shape[1]), (0, v.shape[0])):
            lines = _tile_lines(n, tile, overlap)
            per_line = diff.take(lines, axis=axis).mean(axis=1 - axis) if len(lines) else np.zeros(1)
            assert per_line.max() < 0.05, (tile, axis, per_line.max())
    # and the confidence does not jump across tile lines more than between other neighbours
    conf = res[96][1]
    jumps = np.abs(np.diff(conf, axis=1))
    lines = _tile_lines(v.shape[1], 96, 32)
    assert np.nanmean(jumps[:, lines]) < 1.5 * np.nanmean(jumps)


@pytest.mark.slow
def test_vae_tiled_equals_untiled(tmp_path: Path) -> None:
    """geovae's VAE segmenter, two tilings and one untiled pass, agree away from the border
    (the whole real NC scene: 256-px tiles need a scene several tiles wide)."""
    nc_stack = data_path(NC, "nc_lsat7_2000_6band_uint8.tif")
    model = vae_model(nc_stack, k=4, depth=2)
    ref = untiled(model, nc_stack).argmax(0) + 1
    v = _valid(nc_stack)
    sel = _away_from_border(v, 16)
    out = {}
    for tile, overlap in ((256, 128), (128, 64)):
        r = segment_scene(nc_stack, model, tmp_path / f"t{tile}", tile=tile, overlap=overlap, batch_size=4, **QUIET)
        out[tile] = read(r.outputs["classes"])
        assert (out[tile][sel] == ref[sel]).mean() >= 0.9999
    assert (out[256][v] == out[128][v]).mean() >= 0.995
    counts = np.bincount(out[128][v], minlength=5)
    assert (counts > 0.005 * v.sum()).sum() >= 2  # not a one-class map


@pytest.mark.slow
def test_default_vae_tiling_is_invisible(tmp_path: Path) -> None:
    """The default VAE (the architecture `geovae train` builds) with its measured halo: blending
    only each tile's trustworthy interior, two tilings agree and equal one untiled pass, on the
    whole real NC scene (its 320-px tiles need a scene several tiles wide)."""
    from geovae.training.task import default_architecture

    nc_stack = data_path(NC, "nc_lsat7_2000_6band_uint8.tif")
    arch = default_architecture()
    model = vae_model(nc_stack, k=7, depth=arch.pop("depth"), base=arch.pop("base_channels"), halo=True, **arch)
    h = model.info.halo
    assert h is not None and 0 < h < 128
    ref = untiled(model, nc_stack).argmax(0) + 1
    v = _valid(nc_stack)
    sel = _away_from_border(v, 1)
    out = {}
    for tile in (320, 384):  # the overlap defaults to 2 * halo + 16, so several tiles per axis
        r = segment_scene(nc_stack, model, tmp_path / f"t{tile}", tile=tile, batch_size=4, **QUIET)
        assert r.report["options"]["overlap"] == 2 * h + 16 and r.report["tiles"]["tiles_total"] > 1
        out[tile] = read(r.outputs["classes"])
        assert (out[tile][sel] == ref[sel]).mean() >= 0.9999
    assert (out[320][v] == out[384][v]).mean() >= 0.999
    counts = np.bincount(out[320][v], minlength=8)
    assert (counts > 0.005 * v.sum()).sum() >= 2  # not a one-class map


class _SaturatesOnWhiteNoise(nn.Module):
    """Class 0 grows with high-frequency energy, class 1 is the mean over a 31 x 31 window:
    on white noise class 0 wins everywhere by a wide margin, so the window's edge moves no
    probability; on smooth, image-like input the window decides and reaches 15 px."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hp = x - nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        context = nn.functional.avg_pool2d(x.mean(1, keepdim=True), 31, 1, 15)
        return torch.cat([40 * hp.abs().mean(1, keepdim=True), 4 * context], 1)


def test_halo_is_measured_on_image_like_input_too() -> None:
    """White noise alone measures a halo of 0 for this model (and 8 px for a real parcel model
    whose halo is 29-40); smooth noise finds the 15 px its window reaches."""
    from geovae.model.halo import measure_halo

    assert measure_halo(_SaturatesOnWhiteNoise(), 8, 1) == 15
    assert measure_halo(_SaturatesOnWhiteNoise(), 8, 4) == 16  # rounded up to the stride


def test_overlap_too_small_for_the_halo_warns_once(
    tmp_path: Path, nc_stack: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = vae_model(nc_stack, k=3, depth=2, halo=True)
    h = model.info.halo
    assert h is not None and h > 4
    with caplog.at_level("WARNING", logger="geovae"):
        segment_scene(nc_stack, model, tmp_path / "a", tile=64, overlap=4, **QUIET)
    warned = [r for r in caplog.records if "tile seams may show" in r.getMessage()]
    assert len(warned) == 1 and f"--overlap {2 * h + 16}" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="geovae"):
        r = segment_scene(nc_stack, model, tmp_path / "b", **QUIET)  # the defaults cover the halo
    assert not [r for r in caplog.records if "tile seams" in r.getMessage()]
    assert r.report["options"]["overlap"] >= 2 * h + 16


def test_scene_smaller_than_one_tile(tmp_path: Path, nc_stack: Path) -> None:
    with rasterio.open(nc_stack) as src:
        prof = src.profile | dict(
            width=40, height=30, transform=src.window_transform(Window(100, 60, 40, 30)), tiled=False
        )
        prof.pop("blockxsize"), prof.pop("blockysize")
        small = tmp_path / "small.tif"
        with rasterio.open(small, "w", **prof) as dst:
            dst.write(src.read(window=Window(100, 60, 40, 30)))
    model = conv_model(nc_stack, layers=3)
    r = segment_scene(small, model, tmp_path / "out", tile=256, overlap=64, **QUIET)
    cls = read(r.outputs["classes"])
    assert cls.shape == (30, 40) and r.report["tiles"]["tiles_total"] == 1
    ref = untiled(model, small).argmax(0)
    assert (cls[3:-3, 3:-3] == ref[3:-3, 3:-3]).all()


def test_tta_is_the_mean_over_flips(nc_stack: Path) -> None:
    model = conv_model(nc_stack)
    x = torch.rand(2, 6, 32, 32) * 100
    got = _predict(model, x, 0, False, True, False)["probs"]
    p = model.predict(x)["probs"]
    ref = (p + model.predict(x.flip(-1))["probs"].flip(-1) + model.predict(x.flip(-2))["probs"].flip(-2)) / 3
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, p)


# -- bad input fails before any work ---------------------------------------------------------


def _write(path: Path, data: np.ndarray, **kw: object) -> Path:
    prof = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs="EPSG:32618",
        transform=from_origin(100000, 2800000, 300, 300),
    )
    prof.update(kw)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
    return path


def test_bad_input_fails_before_any_output(tmp_path: Path, rgb_byte: Path, nc_stack: Path) -> None:
    model = conv_model(rgb_byte, k=3)
    out = tmp_path / "out"
    cases = [
        (dict(scene=nc_stack), ModelMismatchError, "has 6 bands but the model expects 3"),
        (
            dict(scene=_write(tmp_path / "empty.tif", np.zeros((3, 50, 50), np.uint8), nodata=0)),
            SceneError,
            "no valid pixels",
        ),
        (dict(tile=30, overlap=30), OptionError, "--overlap 30"),
        (dict(batch_size=0), OptionError, "--batch-size 0"),
        (dict(formats=("shp",)), OptionError, "--formats shp"),
        (dict(samples=-1), OptionError, "--samples -1"),
        (dict(rows=(1, 100)), OptionError, "rows 1:100: must start and end on the 768-row output block grid"),
        (dict(rows=(0, 128), quicklook=True), OptionError, "quicklook shows the whole scene"),  # all 128 rows
        (dict(scene=tmp_path / "missing.tif"), SceneError, "does not exist"),
        (
            dict(
                scene=_write(
                    tmp_path / "photo.tif", np.ones((3, 20, 20), np.uint8), crs=None, transform=Affine.identity()
                )
            ),
            SceneError,
            "pass --pixel-coords",
        ),
        (
            dict(
                scene=_write(
                    tmp_path / "rot.tif",
                    np.ones((3, 20, 20), np.uint8),
                    transform=Affine.translation(0, 0) @ Affine.rotation(10) @ Affine.scale(30, -30),
                )
            ),
            SceneError,
            "rotated or sheared",
        ),
    ]
    for kw, exc, text in cases:
        scene = kw.pop("scene", rgb_byte)
        with pytest.raises(exc, match=text.replace("-", r"\-")) as e:
            segment_scene(scene, model, out, **{**QUIET, **kw})
        assert "\n" not in str(e.value)
        assert not out.exists() or not any(out.iterdir()), kw
    vae = vae_model(rgb_byte, k=3, depth=2)
    with pytest.raises(OptionError, match="multiple of the model's stride 4"):
        segment_scene(rgb_byte, vae, out, tile=30, overlap=4, **QUIET)
    with pytest.raises(ModelMismatchError, match="no reconstruction decoder"):
        segment_scene(rgb_byte, model, out, reconstruction=True, **QUIET)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        segment_scene(rgb_byte, model, afile, **QUIET)
    assert not out.exists() or not any(out.iterdir())


def test_pixel_coords(tmp_path: Path, nc_stack: Path) -> None:
    data = read(nc_stack, None)[:, :100, :120]
    p = _write(tmp_path / "photo.tif", data, crs=None, transform=Affine.identity())
    model = conv_model(nc_stack)
    with pytest.raises(OptionError, match="pixel coordinates"):
        segment_scene(p, model, tmp_path / "o", pixel_coords=True, formats=("geojson",), progress=False)
    r = segment_scene(p, model, tmp_path / "o", pixel_coords=True, progress=False, quicklook=False)
    assert "gpkg" in r.outputs and "geojson" not in r.outputs
    with rasterio.open(r.outputs["classes"]) as ds:
        assert ds.crs is None and ds.shape == (100, 120)
    assert r.report["area_unit"] == "pixel"
    assert sum(c["area_px"] for c in r.report["classes"]) == 100 * 120


def test_corrupt_tile_mid_run_leaves_nothing(tmp_path: Path, nc_stack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = read(nc_stack, None)
    with rasterio.open(nc_stack) as ds:
        crs, transform = ds.crs, ds.transform
    p = _write(
        tmp_path / "bad.tif",
        src,
        crs=crs,
        transform=transform,
        tiled=True,
        blockxsize=64,
        blockysize=64,
        compress="deflate",
        nodata=0,
    )
    with rasterio.open(p) as ds:
        off = int(ds.get_tag_item("BLOCK_OFFSET_2_1", "TIFF", bidx=1))  # block column 2, row 1
        n = int(ds.get_tag_item("BLOCK_SIZE_2_1", "TIFF", bidx=1))
    raw = bytearray(p.read_bytes())
    raw[off + 8 : off + n - 8] = bytes(np.random.default_rng(0).integers(0, 256, n - 16, dtype=np.uint8))
    p.write_bytes(bytes(raw))
    out = tmp_path / "out"
    model = conv_model(nc_stack)
    # the up-front check (a decimated read of this small scene) already trips on it
    with pytest.raises(CorruptSceneError, match="is corrupt at rows 64-127, cols 128-191"):
        segment_scene(p, model, out, tile=64, overlap=16, block_size=64, **QUIET)
    assert not out.exists() or not any(out.iterdir())
    # on a large scene the decimated read and the trust check's sample skip most blocks:
    # then streaming finds it mid-run
    monkeypatch.setattr(Scene, "any_valid", lambda self: True)
    monkeypatch.setattr(Scene, "sample", lambda self, *a, **k: np.zeros((self.count, 0), np.float32))
    with pytest.raises(CorruptSceneError, match="is corrupt at rows 64-127, cols 128-191"):
        segment_scene(p, model, out, tile=64, overlap=16, block_size=64, **QUIET)
    assert not out.exists()  # neither final names nor temporary files, nor the folder the run made


# -- polygons traced while the model runs ------------------------------------------------------


def _by_geometry(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    gdf = gdf.assign(key=shapely.to_wkb(shapely.normalize(gdf.geometry.values)))
    return gdf.sort_values("key").reset_index(drop=True)


def test_polygons_of_a_run_are_those_of_its_finished_raster(tmp_path: Path, nc_stack: Path) -> None:
    """segment traces polygons from each block as it is written (geovae.vector.PolygonStream);
    they must be exactly what vectorising the run's own rasters gives: geometry, class and
    every mean, over several rows and columns of blocks."""
    from geovae.segment.trust import THRESHOLD_QUANTILE
    from geovae.vector import vectorize

    model = vae_model(nc_stack)
    first = segment_scene(
        nc_stack, model, tmp_path / "a", tile=64, overlap=32, samples=2, reconstruction=True, block_size=32, **QUIET
    )
    # A threshold that flags about half of the scene, so anomaly_fraction varies.
    err = read(first.outputs["reconstruction_error"])
    model.info.training = {"reconstruction_error_quantiles": {THRESHOLD_QUANTILE: float(np.nanmedian(err))}}
    r = segment_scene(
        nc_stack,
        model,
        tmp_path / "b",
        tile=64,
        overlap=32,
        samples=2,
        block_size=32,
        progress=False,
        quicklook=False,
        formats=("gpkg", "parquet"),
    )
    assert r.report["tiles"]["blocks_written"] >= 20
    o = r.outputs
    ref = vectorize(
        o["classes"],
        None,
        confidence=o["confidence"],
        uncertainty=o["uncertainty"],
        anomaly=(o["reconstruction_error"], r.report["trust"]["anomaly"]["threshold"]),
        block_size=r.report["tiles"]["block_size"],
    )  # the same blocks: the same vertices
    got = gpd.read_parquet(o["parquet"])
    assert len(got) == len(ref) == r.report["polygons"]["gpkg"] > 100
    a, b = _by_geometry(got), _by_geometry(ref)
    assert (a.key == b.key).all()
    assert (a.class_id == b.class_id).all() and (a.class_name == b.class_name).all()
    for col in ("area_m2", "confidence_mean", "uncertainty_mean", "anomaly_fraction"):
        assert np.allclose(a[col], b[col], rtol=1e-9, equal_nan=True), col
    assert 0.1 < a.anomaly_fraction.mean() < 0.9
    assert len(gpd.read_file(o["gpkg"], layer="nc_lsat7_2000_6band_uint8")) == len(a)
    assert not [t for t in threading.enumerate() if t.name.startswith("geovae-polygon")]  # worker and writers


def test_polygon_worker_failure_fails_the_run_cleanly(
    tmp_path: Path, nc_stack: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in the polygon worker (here a full disk on its third block) stops the run with
    that error, in the caller's thread, and leaves nothing behind; so does an error in the
    model loop while the worker runs."""
    import errno

    from geovae.vector import trace

    real = trace.block_pieces
    calls = [0]

    def failing(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(trace, "block_pieces", failing)
    out = tmp_path / "out"
    model = conv_model(nc_stack)
    with pytest.raises(OutputError, match="no space left"):
        segment_scene(nc_stack, model, out, tile=64, overlap=16, block_size=64, progress=False, quicklook=False)
    assert not out.exists()  # the run made the folder and removed it
    monkeypatch.setattr(trace, "block_pieces", real)

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("model exploded")

    monkeypatch.setattr(model, "predict", broken)
    with pytest.raises(RuntimeError, match="model exploded"):
        segment_scene(nc_stack, model, out, tile=64, overlap=16, block_size=64, progress=False, quicklook=False)
    assert not out.exists()  # the run made the folder and removed it
    assert not [t for t in threading.enumerate() if t.name.startswith("geovae-polygon")]  # worker and writers


def test_polygon_threads_need_no_import_lock(tmp_path: Path, nc_stack: Path) -> None:
    """The polygon worker and format writers import nothing once started: a signal raised
    in the main thread during an import can leave the interpreter's import lock held, and a
    thread importing after that hangs. Here the main thread
    holds the lock on purpose for the whole run, in a fresh process; the run must finish."""
    import subprocess
    import sys

    code = f"""
import _imp
from geovae.segment import segment_scene
from tests.test_predict import conv_model
from pathlib import Path
model = conv_model(Path({str(nc_stack)!r}))
_imp.acquire_lock()  # as a leaked lock would be: held by the main thread, reentrant for it alone
r = segment_scene({str(nc_stack)!r}, model, {str(tmp_path / "o")!r}, tile=64, overlap=16, block_size=64,
                  progress=False, quicklook=False, formats=("geojson", "gpkg", "parquet"))
print(r.report["polygons"]["geojson"])
"""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) > 10


# -- remote reading ----------------------------------------------------------------------------


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support, which GDAL's /vsicurl/ needs."""

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        size = path.stat().st_size
        rng = self.headers.get("Range")
        f = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) if b else size - 1, size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            f.seek(start)
            self._left = end - start + 1
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self._left = size
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return f

    def copyfile(self, source, outputfile):  # type: ignore[no-untyped-def]
        outputfile.write(source.read(self._left))


@pytest.fixture
def http_root(rgb_byte: Path) -> Iterator[str]:
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(rgb_byte.parent), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    os.environ["GDAL_DISABLE_READDIR_ON_OPEN"] = "EMPTY_DIR"
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        os.environ.pop("GDAL_DISABLE_READDIR_ON_OPEN", None)
        server.shutdown()
        server.server_close()


def test_remote_scene_gives_identical_outputs(tmp_path: Path, rgb_byte: Path, http_root: str) -> None:
    model = conv_model(rgb_byte, k=3)
    local = segment_scene(rgb_byte, model, tmp_path / "local", tile=128, overlap=32, **QUIET)
    remote = segment_scene(f"{http_root}/{rgb_byte.name}", model, tmp_path / "remote", tile=128, overlap=32, **QUIET)
    assert remote.report["scene"]["path"].startswith("http://127.0.0.1")
    for kind in ("classes", "confidence"):
        assert remote.outputs[kind].name == local.outputs[kind].name
        with rasterio.open(local.outputs[kind]) as a, rasterio.open(remote.outputs[kind]) as b:
            assert a.crs == b.crs and a.transform == b.transform
            np.testing.assert_array_equal(a.read(), b.read())


# -- class areas: the polygons' convention, whatever the CRS ------------------------------------


def _assert_report_matches_polygons(r: object, min_classes: int = 2) -> None:
    """Per class, the report's area equals the summed area_m2 of the class's polygons (0.01 %)."""
    poly = gpd.read_file(r.outputs["gpkg"]).groupby("class_id")["area_m2"].sum()  # type: ignore[attr-defined]
    rep = {c["id"]: c["area_m2"] for c in r.report["classes"] if c["pixels"]}  # type: ignore[attr-defined]
    assert set(rep) == set(poly.index) and len(rep) >= min_classes
    for cid, area in rep.items():
        assert area == pytest.approx(poly[cid], rel=1e-4), cid


def test_report_areas_use_the_polygons_convention(tmp_path: Path, rgb_byte: Path) -> None:
    """Planar areas in a projected CRS, geodesic areas in a geographic one: report and polygons agree."""
    from pyproj import Geod

    kw = dict(progress=False, quicklook=False, formats=("gpkg",))
    # UTM 18N (RGB.byte, 300 m pixels): planar, every pixel the same area
    r = segment_scene(rgb_byte, conv_model(rgb_byte, k=3, layers=1, tile=256), tmp_path / "utm", **kw)
    assert r.report["area_unit"].startswith("m2 (planar")
    _assert_report_matches_polygons(r)
    with rasterio.open(rgb_byte) as ds:
        px = abs(ds.transform.a * ds.transform.e)
    assert sum(c["area_m2"] for c in r.report["classes"]) == pytest.approx(_valid(rgb_byte).sum() * px, rel=1e-9)
    # Web Mercator (shade.tif, 40 N): planar map area too, as a GIS shows the polygons in that CRS
    # (the ground area is smaller by cos^2(latitude); docs/formats.md says to reproject for it)
    shade = rgb_byte.parent / "shade.tif"
    r = segment_scene(shade, conv_model(shade, k=2, layers=1, tile=256), tmp_path / "sh", **kw)
    _assert_report_matches_polygons(r, min_classes=1)  # a random net on one hillshade band: one class
    with rasterio.open(shade) as ds:
        px = abs(ds.transform.a * ds.transform.e)
    assert sum(c["area_m2"] for c in r.report["classes"]) == pytest.approx(_valid(shade).sum() * px, rel=1e-9)
    # EPSG:4326 input (SpaceNet-3 Las Vegas, ~0.3 m pixels): geodesic square metres
    lv = rgb_byte.parents[1] / "spacenet_solaris" / "original" / "road_mask_input.tif"
    if not lv.exists():
        pytest.skip(f"real data not found: {lv}")
    r = segment_scene(lv, conv_model(lv, k=2, layers=1, tile=256), tmp_path / "lv", **kw)
    assert r.report["area_unit"].startswith("m2 (geodesic")
    _assert_report_matches_polygons(r)
    with rasterio.open(lv) as ds:
        b = ds.bounds
    geod = Geod(ellps="WGS84")
    ref = abs(geod.polygon_area_perimeter([b.left, b.right, b.right, b.left], [b.bottom, b.bottom, b.top, b.top])[0])
    assert sum(c["area_m2"] for c in r.report["classes"]) == pytest.approx(ref, rel=1e-3)
    assert 200 < ref < 400  # ~19 m x 16 m (64 px): square metres, not square degrees


def test_reader_windows_give_the_tiles_read_one_by_one(nc_stack: Path) -> None:
    """Tiles cut from shared read windows (several threads, any window size) equal tiles read alone."""
    from geovae.segment.predict import buffering
    from geovae.segment.reader import Reader as _Reader
    from geovae.segment.reader import read_groups as _read_groups
    from geovae.tiling import TileGrid

    s = open_scene(nc_stack)
    tiles = list(TileGrid(s.height, s.width, 64, 16))
    mean = np.full(6, 50.0, np.float32)
    ref = []
    for t in tiles:
        d, v = s.read(t.window)
        ref.append(s.fill_missing(d, v, mean)) if v.any() else None
    ref_x = torch.from_numpy(np.stack(ref))
    whole, small = 2**24, 6 * 4 * 64 * 112  # one window for the scene; windows of two tiles side by side
    assert len(_read_groups([tiles], 6, whole)) == 1 and max(len(g) for g in _read_groups([tiles], 6, small)) == 2
    # A CPU run's queue holds one batch (buffering): the reader still hands out every tile.
    cpu_prefetch = buffering(torch.device("cpu")).prefetch
    assert cpu_prefetch < buffering(torch.device("cuda")).prefetch
    for workers, budget, prefetch in ((1, whole, 3), (3, whole, cpu_prefetch), (3, small, cpu_prefetch)):
        groups = _read_groups([tiles], 6, budget)
        with _Reader(s, groups, 5, mean, pin=False, prefetch=prefetch, workers=workers) as reader:
            batches = list(reader)
        entries = [e for b in batches for e in b.entries]
        assert [t for t, _ in entries] == tiles
        assert sum(run for _, run in entries) == len(ref)
        torch.testing.assert_close(torch.cat([b.x for b in batches if b.x is not None]), ref_x, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path: Path, nc_stack: Path) -> None:
    """Pinned batches, asynchronous copies and AMP on the GPU give the CPU's classes."""
    cpu = conv_model(nc_stack)
    import copy

    gpu = SegmentationModel(copy.deepcopy(cpu.module), cpu.info, "cuda")
    a = segment_scene(nc_stack, cpu, tmp_path / "cpu", tile=64, overlap=16, **QUIET)
    b = segment_scene(nc_stack, gpu, tmp_path / "gpu", tile=64, overlap=16, batch_size=16, **QUIET)
    assert b.report["options"]["device"].startswith("cuda")
    v = _valid(nc_stack)
    assert (read(a.outputs["classes"])[v] == read(b.outputs["classes"])[v]).mean() >= 0.999


def test_model_file_path_gives_the_same_result(tmp_path: Path, nc_stack: Path) -> None:
    """segment_scene loads a saved model file itself (no code unpickled) with the same result."""
    from geovae.model.io import read_model_info, save_model

    model = vae_model(nc_stack, k=3, depth=2, tile=128, base=4)
    path = save_model(tmp_path / "m.safetensors", model.module, model.info)
    model.info.halo = read_model_info(path).halo  # measured when the file was written
    assert model.info.halo is not None
    a = segment_scene(nc_stack, model, tmp_path / "a", **QUIET)
    b = segment_scene(nc_stack, path, tmp_path / "b", device="cpu", **QUIET)
    assert b.report["model"]["source"] == str(path) and b.report["model"]["kind"] == "geovae-vae"
    np.testing.assert_array_equal(read(a.outputs["classes"]), read(b.outputs["classes"]))


def test_latent_samples_are_reproducible(tmp_path: Path, nc_stack: Path) -> None:
    """Two runs with latent samples write the same rasters, and the caller's RNG is left alone."""
    model = vae_model(nc_stack, k=4, depth=2)
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(123)
        r = segment_scene(nc_stack, model, tmp_path / name, tile=128, overlap=32, samples=4, **QUIET)
        after = torch.rand(1)
        runs.append(r)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1)), "segment_scene changed the caller's random state"
    a, b = (read(r.outputs["uncertainty"], band=None) for r in runs)
    assert np.array_equal(a, b, equal_nan=True)
    assert np.nanmax(a[1]) > 0, "the samples differ from each other (mutual information above 0)"
    assert np.array_equal(read(runs[0].outputs["classes"]), read(runs[1].outputs["classes"]))
