"""Streaming stitching: exact blending, output file properties, bounded memory."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from blockrun import BlockRun
from rasterio.transform import from_origin
from torch import nn

from geovae.blend import Blender, BlockGrid
from geovae.classes import CLASS_NODATA
from geovae.model.base import ModelInfo, SegmentationModel
from geovae.segment import segment_scene
from geovae.tiling import TileGrid

CRS = "EPSG:32621"
TRANSFORM = from_origin(717345.0, -2776995.0, 30.0, 30.0)


def _info(k: int = 3) -> ModelInfo:
    return ModelInfo(
        in_channels=3,
        num_classes=k,
        class_ids=[1, 5, 9][:k],
        class_names=["water", "forest", "crop"][:k],
        class_colors=[(0, 0, 255), (0, 128, 0), (255, 255, 0)][:k],
    )


def _feed_constant(st: BlockRun, valid_fn=None) -> dict[tuple[int, int], np.ndarray]:
    """Each tile predicts one random distribution everywhere; returns them by tile."""
    rng = np.random.default_rng(0)
    given = {}
    for t in st.order():
        p = rng.dirichlet(np.ones(st.K)).astype(np.float32)
        given[(t.i, t.j)] = p
        valid = np.ones((t.size, t.size), bool) if valid_fn is None else valid_fn(t)
        if not valid.any():
            st.skip(t)
            continue
        st.add(
            t,
            valid,
            np.broadcast_to(p[:, None, None], (st.K, t.size, t.size)).copy(),
            expected_entropy=np.full((t.size, t.size), 0.25, np.float32) if st.uncertainty else None,
        )
    return given


@pytest.mark.parametrize("tile,overlap,block", [(64, 16, 96), (50, 0, 100), (40, 24, 40), (32, 20, 12)])
def test_blending_matches_the_formula_and_files_are_right(tmp_path: Path, tile: int, overlap: int, block: int) -> None:
    h, w = 300, 410
    grid = TileGrid(h, w, tile, overlap)
    st = BlockRun(grid, tmp_path, "scene", _info(), CRS, TRANSFORM, uncertainty=True, block_size=block)
    assert st.blocks.side < h and st.blocks.block_cols > 1  # several blocks, so spill strips are exercised
    given = _feed_constant(st)
    paths = st.close()
    # reference: the same weighted mean computed over the whole scene at once
    num = np.zeros((3, h + tile, w + tile))
    den = np.zeros((h + tile, w + tile))
    for t in grid:
        wt = grid.weights(t)
        num[:, t.row : t.row + tile, t.col : t.col + tile] += given[(t.i, t.j)][:, None, None] * wt
        den[t.row : t.row + tile, t.col : t.col + tile] += wt
    ref = num[:, :h, :w] / den[:h, :w]
    with rasterio.open(paths["confidence"]) as ds:
        conf = ds.read(1)
        assert ds.profile["compress"] == "zstd" and ds.block_shapes[0] == (256, 256) and ds.overviews(1) == [2]
    np.testing.assert_allclose(conf, ref.max(0), atol=1e-5)
    # the scene corner is seen by one tile only: exactly that tile's value
    assert conf[0, 0] == pytest.approx(given[(0, 0)].max(), abs=1e-7)
    with rasterio.open(paths["classes"]) as ds:
        cls = ds.read(1)
        assert ds.nodata == CLASS_NODATA and ds.crs.to_epsg() == 32621 and ds.transform == TRANSFORM
        assert ds.colormap(1)[5][:3] == (0, 128, 0)
        assert ds.tags()["CLASS_9"] == "crop" and json.loads(ds.tags()["CLASSES"])[0]["name"] == "water"
    np.testing.assert_array_equal(cls, np.array([1, 5, 9], np.uint8)[ref.argmax(0)])
    with rasterio.open(paths["uncertainty"]) as ds:
        u = ds.read()
        assert ds.descriptions == ("predictive entropy (nats)", "mutual information (nats)")
    pe = -(ref * np.log(ref)).sum(0)
    np.testing.assert_allclose(u[0], pe, atol=1e-4)
    np.testing.assert_allclose(u[1], np.clip(pe - 0.25, 0, None), atol=1e-4)
    assert not list(tmp_path.glob("*.part"))
    nbr = -(-h // st.blocks.side)
    assert st.blender.tiles_run == len(grid) and st.blender.blocks_done == nbr * st.blocks.block_cols


def test_invalid_pixels_are_nodata_everywhere(tmp_path: Path) -> None:
    h, w, tile, overlap = 200, 200, 64, 16
    grid = TileGrid(h, w, tile, overlap)
    yy, xx = np.mgrid[: h + tile, : w + tile]
    scene_valid = (xx + yy > 150) & (yy < h) & (xx < w)  # a nodata triangle in the corner
    st = BlockRun(grid, tmp_path, "s", _info(), CRS, TRANSFORM, uncertainty=True, block_size=64)
    _feed_constant(st, lambda t: scene_valid[t.row : t.row + t.size, t.col : t.col + t.size])
    paths = st.close()
    assert st.blender.tiles_skipped >= 1  # the tile at the corner is entirely nodata
    v = scene_valid[:h, :w]
    with rasterio.open(paths["classes"]) as ds:
        assert ((ds.read(1) == CLASS_NODATA) == ~v).all()
    for kind in ("confidence", "uncertainty"):
        with rasterio.open(paths[kind]) as ds:
            assert (np.isnan(ds.read()) == ~v).all()


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    st = BlockRun(TileGrid(100, 100, 32, 8), tmp_path, "s", _info(), CRS, TRANSFORM)
    assert list(tmp_path.glob("*.part"))
    st.abort()
    assert not list(tmp_path.iterdir())


def _vrt_mosaic(src: Path, out: Path, ny: int, nx: int, size: int = 256) -> Path:
    """A VRT that tiles a ``size`` x ``size`` crop of ``src`` ny x nx times."""
    with rasterio.open(src) as ds:
        count, dtype = ds.count, ds.dtypes[0]
        t = ds.transform
    gdal_type = {"uint16": "UInt16", "uint8": "Byte"}[dtype]
    bands = []
    for b in range(1, count + 1):
        srcs = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{src}</SourceFilename><SourceBand>{b}</SourceBand>'
            f'<SrcRect xOff="600" yOff="600" xSize="{size}" ySize="{size}"/>'
            f'<DstRect xOff="{j * size}" yOff="{i * size}" xSize="{size}" ySize="{size}"/></SimpleSource>'
            for i in range(ny)
            for j in range(nx)
        )
        bands.append(f'<VRTRasterBand dataType="{gdal_type}" band="{b}">{srcs}</VRTRasterBand>')
    with rasterio.open(src) as ds:
        wkt = ds.crs.to_wkt()
    gt = f"{t.c}, {t.a}, 0, {t.f}, 0, {t.e}"
    out.write_text(
        f'<VRTDataset rasterXSize="{nx * size}" rasterYSize="{ny * size}"><SRS>{wkt}</SRS>'
        f"<GeoTransform>{gt}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )
    return out


def test_memory_does_not_grow_with_scene_height(tmp_path: Path, parana: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    info = ModelInfo(in_channels=3, num_classes=4, mean=[9000.0] * 3, std=[1500.0] * 3, tile_size=64)
    model = SegmentationModel(net, info, "cpu")
    peaks = {}
    for ny in (1, 4):
        vrt = _vrt_mosaic(parana, tmp_path / f"mosaic{ny}.vrt", ny, 2)
        r = segment_scene(
            vrt,
            model,
            tmp_path / f"out{ny}",
            tile=64,
            overlap=16,
            block_size=96,
            formats=(),
            quicklook=False,
            progress=False,
        )
        peaks[ny] = r.report["tiles"]["peak_buffer_bytes"]
        with rasterio.open(r.outputs["classes"]) as ds:
            assert ds.shape == (256 * ny, 512)
    # 4x the pixels, the same live accumulator bytes: memory is set by tile/block size
    assert peaks[1] == peaks[4] > 0
    blender = Blender(BlockGrid(TileGrid(1024, 512, 64, 16), 96), info)
    full_scene_buffer = 1024 * 512 * blender.channels * 4
    assert peaks[4] <= blender.memory_bound() < full_scene_buffer / 10


def _feed_per_tile(st: BlockRun) -> None:
    """Per-pixel random outputs seeded by the tile's grid position, so any run of a tile gives the same."""
    for t in st.order():
        rng = np.random.default_rng((t.i, t.j))
        p = rng.random((st.K, t.size, t.size), dtype=np.float32) + 0.01
        p /= p.sum(0)
        valid = rng.random((t.size, t.size)) > 0.1
        st.add(t, valid, p, expected_entropy=rng.random((t.size, t.size), dtype=np.float32) if st.uncertainty else None)


def _read_all(paths: dict[str, Path]) -> dict[str, tuple]:
    out = {}
    for kind, p in paths.items():
        with rasterio.open(p) as ds:
            out[kind] = (ds.read(), ds.transform, ds.crs, ds.colormap(1) if kind == "classes" else None, ds.tags())
    return out


@pytest.mark.parametrize("tile,overlap,block", [(64, 16, 96), (40, 24, 16)])
def test_row_bands_equal_the_whole_run_and_assemble_to_it(tmp_path: Path, tile: int, overlap: int, block: int) -> None:
    """Blocks over row bands give the whole run's rows bit for bit; RowBands joins them into its files."""
    from rasterio.windows import Window

    from geovae.blend import block_side
    from geovae.blocks import Block
    from geovae.errors import OptionError
    from geovae.segment.assemble import RowBands

    grid = TileGrid(203, 150, tile, overlap)
    for d in ("full", "band0", "band1", "band2", "asm", "x", "y"):
        (tmp_path / d).mkdir()
    full = BlockRun(grid, tmp_path / "full", "s", _info(), CRS, TRANSFORM, uncertainty=True, block_size=block)
    _feed_per_tile(full)
    ref = _read_all(full.close())
    B = block_side(block, tile - overlap)
    assert full.blocks.side == B and B % (tile - overlap) == 0
    cuts = [0, B, 2 * B, 203]  # the last band ends at the scene's edge, off the block grid
    bands, parts = [], []
    for k, (a, b) in enumerate(itertools.pairwise(cuts)):
        st = BlockRun(
            grid, tmp_path / f"band{k}", "s", _info(), CRS, TRANSFORM, uncertainty=True, block_size=block, rows=(a, b)
        )
        assert all(t.row < b and t.row + t.size > a for t in st.order())  # only tiles that touch the band
        _feed_per_tile(st)
        paths = st.close()
        got = _read_all(paths)
        for kind, (data, transform, crs, _, _) in got.items():
            assert data.shape[1:] == (b - a, 150) and crs == ref[kind][2]
            assert transform == TRANSFORM @ TRANSFORM.translation(0, a)
            np.testing.assert_array_equal(data, ref[kind][0][:, a:b], err_msg=f"{kind} rows {a}:{b}")
        bands.append((a, b))
        parts.append({"rasters": paths, "tiles": st.blender.summary()})
    # Assembling the bands block by block gives the whole run's files, class counts and areas.
    asm = BlockRun(grid, tmp_path / "asm", "s", _info(), CRS, TRANSFORM, uncertainty=True, block_size=block)
    for blk in RowBands(asm.blocks, bands, parts):
        asm.put(blk)
    got = _read_all(asm.close(blend=False))
    for kind in ref:
        np.testing.assert_array_equal(got[kind][0], ref[kind][0])
        assert got[kind][1:] == ref[kind][1:]
    assert asm.counts is not None and full.counts is not None
    np.testing.assert_array_equal(asm.counts.class_pixels, full.counts.class_pixels)
    np.testing.assert_array_equal(asm.counts.class_area, full.counts.class_area)
    # Misuse is refused: rows off the block grid, a block out of order, blocks missing.
    with pytest.raises(OptionError, match="block grid"):
        BlockRun(grid, tmp_path / "x", "s", _info(), CRS, TRANSFORM, block_size=block, rows=(1, B))
    st = BlockRun(grid, tmp_path / "y", "s", _info(), CRS, TRANSFORM, uncertainty=True, block_size=block)
    first = next(st.blocks.windows())
    values = {k: v[:, : first.height, : first.width] for k, v in {kind: ref[kind][0] for kind in ref}.items()}
    with pytest.raises(ValueError, match="not an output block"):
        st.put(Block(Window(1, 0, first.width, first.height), values))
    st.put(Block(first, values))
    with pytest.raises(ValueError, match="never given"):
        st.close(blend=False)
    assert not list((tmp_path / "y").iterdir())  # the failed close removed its temporary files


def test_cog_copy_compresses_with_the_runs_threads_and_writes_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    import geovae.sinks.rasters as stitch
    from geovae.products import cog_options, raster_profile

    torch_threads = torch.get_num_threads()
    assert stitch.cog_threads() == torch_threads
    assert cog_options("confidence", threads=2)["NUM_THREADS"] == "2"
    assert "NUM_THREADS" not in cog_options("confidence")
    with rasterio.Env(GDAL_NUM_THREADS="1"):  # the user's own GDAL setting wins
        assert stitch.cog_threads() is None
    monkeypatch.setenv("GDAL_NUM_THREADS", "3")
    assert stitch.cog_threads() is None
    monkeypatch.delenv("GDAL_NUM_THREADS")

    src = tmp_path / "scratch.tif"
    rng = np.random.default_rng(0)
    prof = raster_profile("confidence", width=600, height=500, crs=CRS, transform=TRANSFORM, stream=True)
    with rasterio.open(src, "w", **prof) as ds:
        ds.write(rng.random((1, 500, 600), dtype=np.float32))
    digests = []
    for n in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
        dst = stitch.write_cog(src, tmp_path / f"cog{n}.tif", "confidence")
        digests.append(hashlib.sha256(dst.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("tile,overlap", [(56, 48), (72, 56), (96, 48)])
def test_scene_edge_pixels_come_from_the_tile_whose_edge_is_the_scenes(tmp_path: Path, tile: int, overlap: int) -> None:
    """A model is wrong within its halo of a tile edge, except where that edge is the scene's
    top or left edge (every tiling and an untiled pass see the same edge there). Blended with
    the halo as margin, no wrong value may reach the output, near the scene's edges included,
    even when the step is shorter than the halo (the second tile's edge then lies within the
    first tile's edge zone)."""
    h, w, halo = 150, 130, 20
    grid = TileGrid(h, w, tile, overlap, margin=halo)
    assert grid.margin == halo and (grid.step < halo or tile == 96)
    st = BlockRun(grid, tmp_path, "scene", _info(2), CRS, TRANSFORM, block_size=64)
    for t in st.order():
        r = np.arange(t.size)

        def near(start: int, r: np.ndarray = r, size: int = t.size) -> np.ndarray:
            return ((r < halo) & (start > 0)) | (r >= size - halo)

        wrong = near(t.row)[:, None] | near(t.col)[None, :]
        probs = np.stack([wrong, ~wrong]).astype(np.float32)  # class 2 right, class 1 wrong
        st.add(t, np.ones((t.size, t.size), bool), probs)
    paths = st.close()
    with rasterio.open(paths["classes"]) as ds:
        cls = ds.read(1)
    with rasterio.open(paths["confidence"]) as ds:
        conf = ds.read(1)
    assert (cls == 5).all(), f"{(cls != 5).sum()} pixels took a value from within a tile's halo"
    # the halo keeps a tiny weight floor (never zero at a scene edge): its wrong votes stay below 1e-4
    assert np.abs(conf - 1.0).max() < 1e-4, f"confidence {conf.min()}: a tile's halo was mixed in"
