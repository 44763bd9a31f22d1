"""Opening, validating, describing and reading scenes (real rasters, synthetic edge cases)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.transform import from_origin
from rasterio.windows import Window

from geovae.errors import CorruptSceneError, SceneError
from geovae.scene import describe_scene, gdal_path, open_scene


def _write(path: Path, data: np.ndarray, **kw: object) -> Path:
    prof = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs="EPSG:32621",
        transform=from_origin(700000, 7000000, 30, 30),
    )
    prof.update(kw)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
    return path


# -- describe_scene on the real rasters ----------------------------------------------------


def test_describe_nc_stack(nc_stack: Path) -> None:
    d = describe_scene(nc_stack)
    json.dumps(d)  # must serialise as is
    assert (d["epsg"], d["width"], d["height"], d["count"]) == (3358, 256, 144, 6)
    assert d["descriptions"][0] == "B1_blue" and d["nodata"] == 0
    # columns 136.., rows 296.. of the scene whose corner is (630534, 228114)
    assert d["transform"] == [28.5, 0.0, 630534.0 + 136 * 28.5, 0.0, -28.5, 228114.0 - 296 * 28.5]
    lon0, lat0, lon1, lat1 = d["bounds_wgs84"]
    assert -79 < lon0 < lon1 < -78 and 35 < lat0 < lat1 < 36  # near Raleigh, NC
    assert d["is_tiled"] and d["block_shapes"][0] == [64, 64] and d["compression"] == "deflate"
    assert d["mask_flags"][0] == ["nodata"] and d["alpha_band"] is None


def test_describe_rgb_rgba_shade(rgb_byte: Path, rgba_byte: Path) -> None:
    rgb = describe_scene(rgb_byte)
    assert rgb["nodata"] == 0 and rgb["epsg"] == 32618 and rgb["count"] == 3
    rgba = describe_scene(rgba_byte)
    assert rgba["alpha_band"] == 4 and rgba["data_count"] == 3 and "alpha" in rgba["mask_flags"][0]
    shade = describe_scene(rgb_byte.parent / "shade.tif")
    assert shade["epsg"] == 3857 and shade["nodata"] == 255 and shade["count"] == 1
    json.dumps([rgb, rgba, shade])


def test_describe_reports_missing_crs(tmp_path: Path) -> None:
    p = _write(tmp_path / "photo.tif", np.ones((3, 8, 8), np.uint8), crs=None, transform=Affine.identity())
    d = describe_scene(p)
    assert d["crs"] is None and d["epsg"] is None and d["bounds_wgs84"] is None


# -- validation ----------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_directory_and_text(tmp_path: Path) -> None:
    with pytest.raises(SceneError) as e:
        open_scene(tmp_path / "nope.tif")
    assert "does not exist" in _one_line(e)
    with pytest.raises(SceneError) as e:
        open_scene(tmp_path)
    assert "directory" in _one_line(e)
    txt = tmp_path / "notes.tif"
    txt.write_text("this is not a raster\n" * 20)
    with pytest.raises(SceneError) as e:
        describe_scene(txt)
    assert "not a raster" in _one_line(e)


def test_truncated_tiff(tmp_path: Path, nc_stack: Path) -> None:
    raw = nc_stack.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(SceneError) as e:
        open_scene(cut)
    assert "truncated" in _one_line(e) or "corrupt" in _one_line(e)


def test_no_crs_refused_unless_pixel_coords(tmp_path: Path) -> None:
    p = _write(tmp_path / "photo.tif", np.ones((3, 16, 16), np.uint8), crs=None, transform=Affine.identity())
    with pytest.raises(SceneError) as e:
        open_scene(p)
    assert _one_line(e).endswith(
        "has no CRS; it looks like an image without georeferencing; pass --pixel-coords to segment it in pixel coordinates"
    )
    s = open_scene(p, pixel_coords=True)
    assert s.crs is None and s.pixel_coords and s.count == 3


def test_rotated_transform_refused(tmp_path: Path) -> None:
    rot = Affine.translation(700000, 7000000) @ Affine.rotation(15) @ Affine.scale(30, -30)
    p = _write(tmp_path / "rot.tif", np.ones((1, 16, 16), np.uint8), transform=rot)
    with pytest.raises(SceneError) as e:
        open_scene(p)
    assert "rotated or sheared" in _one_line(e)
    with pytest.raises(SceneError):
        describe_scene(p)


def test_unsupported_dtype(tmp_path: Path) -> None:
    p = _write(tmp_path / "cplx.tif", np.ones((1, 8, 8), np.complex64))
    with pytest.raises(SceneError) as e:
        open_scene(p)
    assert "complex64" in _one_line(e)


def test_corrupt_tile_named(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "tiled.tif",
        np.random.default_rng(0).integers(1, 5000, (3, 512, 512)).astype(np.uint16),
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
    )
    with rasterio.open(p) as ds:
        off = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        n = int(ds.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    raw = bytearray(p.read_bytes())
    raw[off + 8 : off + n - 8] = np.random.default_rng(1).integers(0, 256, n - 16, dtype=np.uint8).tobytes()
    p.write_bytes(bytes(raw))
    s = open_scene(p)  # the header and the other tiles are fine
    data, valid = s.read(Window(0, 0, 256, 256))
    assert valid.all() and data.shape == (3, 256, 256)
    with pytest.raises(CorruptSceneError) as e:
        s.read(Window(192, 192, 256, 256))
    assert "is corrupt at rows 256-511, cols 256-511" in _one_line(e)


# -- reading -------------------------------------------------------------------------------


def test_read_pads_past_the_edge(nc_stack: Path) -> None:
    s = open_scene(nc_stack)  # 256 x 144: the window holds 89 columns and 43 rows of it
    data, valid = s.read(Window(167, 101, 128, 128))
    assert data.shape == (6, 128, 128) and data.dtype == np.float32
    with rasterio.open(nc_stack) as ds:
        ref = ds.read(window=Window(167, 101, 89, 43)).astype(np.float32)
        mask = ds.dataset_mask(window=Window(167, 101, 89, 43)) > 0
    np.testing.assert_array_equal(data[:, :43, :89], ref)
    np.testing.assert_array_equal(valid[:43, :89], mask)
    assert valid[:43, :89].any() and not valid[:43, :89].all()  # across the scene's own nodata edge
    assert not valid[43:].any() and not valid[:, 89:].any() and (data[:, 43:] == 0).all()


def test_nodata_frame_and_alpha(rgb_byte: Path, rgba_byte: Path) -> None:
    s = open_scene(rgb_byte)
    _, valid = s.read(Window(0, 0, s.width, s.height))
    with rasterio.open(rgb_byte) as ds:
        np.testing.assert_array_equal(valid, ds.dataset_mask() > 0)
    a = open_scene(rgba_byte)
    assert a.count == 3 and a.bands == [1, 2, 3] and a.mask_kind == "alpha"
    d, va = a.read(Window(0, 0, a.width, a.height))
    with rasterio.open(rgba_byte) as ds:
        np.testing.assert_array_equal(va, ds.read(4) > 0)
    assert d.shape[0] == 3 and 0.6 < va.mean() < 0.8


def test_nodata_override_parana(parana: Path) -> None:
    plain = open_scene(parana)
    assert plain.nodata is None and plain.mask_kind == "none"
    s = open_scene(parana, nodata=0)
    assert s.nodata == 0 and s.mask_kind == "nodata"
    whole = Window(0, 0, s.width, s.height)
    data, valid = s.read(whole)
    assert (~valid).any() and valid.any()
    np.testing.assert_array_equal(~valid, (data == 0).all(0))
    assert plain.read(whole)[1].all()


def test_to_dask_lazy_and_equal(nc_stack: Path) -> None:
    s = open_scene(nc_stack)
    arr = s.to_dask(64)
    assert arr.shape == (6, 144, 256) and arr.chunksize == (6, 64, 64)
    full, valid = s.read(Window(0, 0, 256, 144))
    np.testing.assert_array_equal(arr[:, 50:140, 30:230].compute(), full[:, 50:140, 30:230])
    np.testing.assert_array_equal(s.to_dask(48, valid=True).compute(), valid)
    assert s.any_valid()


def test_scene_pickles_for_dask_workers(nc_stack: Path) -> None:
    s = open_scene(nc_stack)
    s.read(Window(0, 0, 8, 8))
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(s2.read(Window(5, 5, 9, 9))[0], s.read(Window(5, 5, 9, 9))[0])


def test_gdal_paths() -> None:
    assert gdal_path("s3://bucket/a/b.tif") == "/vsis3/bucket/a/b.tif"
    assert gdal_path("https://host/x.tif") == "/vsicurl/https://host/x.tif"
    assert gdal_path("/vsicurl/http://h/x.tif") == "/vsicurl/http://h/x.tif"


def test_all_nodata_scene_has_no_valid(tmp_path: Path) -> None:
    p = _write(tmp_path / "empty.tif", np.zeros((2, 64, 64), np.uint16), nodata=0)
    assert not open_scene(p).any_valid()
    data = np.zeros((2, 64, 64), np.uint16)
    data[:, 63, 63] = 7  # one valid pixel that a decimated read would miss
    p2 = _write(tmp_path / "sparse.tif", data, nodata=0)
    assert open_scene(p2).any_valid()


def test_gdal_block_cache_is_capped_never_raised_and_restored() -> None:
    """Streaming runs cap GDAL's block cache (it would otherwise keep every block read or
    written, up to 5 % of RAM) and leave the user's setting as it was."""
    from rasterio.env import get_gdal_config

    from geovae.scene import capped_gdal_cache

    with rasterio.Env(GDAL_CACHEMAX=512 * 2**20):
        with capped_gdal_cache(64 * 2**20):
            assert int(get_gdal_config("GDAL_CACHEMAX")) == 64 * 2**20
        assert int(get_gdal_config("GDAL_CACHEMAX")) == 512 * 2**20
    with rasterio.Env(GDAL_CACHEMAX=16 * 2**20), capped_gdal_cache(64 * 2**20):
        assert int(get_gdal_config("GDAL_CACHEMAX")) == 16 * 2**20  # a smaller user setting stays
