"""Tile grid coverage and blending weights."""

from __future__ import annotations

import numpy as np
import pytest

from geovae.errors import OptionError
from geovae.tiling import BATCH_PIXELS, EPSILON, TileGrid, blend_weights, check_options, default_tiling


@pytest.mark.parametrize(
    "h,w,tile,overlap",
    [
        (443, 489, 128, 32),
        (100, 60, 256, 64),
        (1, 1, 16, 0),
        (256, 256, 256, 64),
        (1860, 2041, 256, 64),
        (97, 300, 32, 31),
    ],
)
def test_every_pixel_covered_on_a_regular_grid(h: int, w: int, tile: int, overlap: int) -> None:
    g = TileGrid(h, w, tile, overlap)
    hits = np.zeros((h + tile, w + tile), np.int32)
    for t in g:
        assert t.row == t.i * g.step and t.col == t.j * g.step and t.size == tile
        hits[t.row : t.row + tile, t.col : t.col + tile] += 1
    assert (hits[:h, :w] >= 1).all()  # right and bottom edges included, never dropped
    # no tile is wasted: dropping the last row or column would leave pixels uncovered
    assert (g.rows - 1) * g.step < max(h - overlap, 1) and (g.cols - 1) * g.step < max(w - overlap, 1)
    assert len(g) == g.rows * g.cols == len(list(g))


def test_smaller_than_one_tile() -> None:
    g = TileGrid(40, 30, 256, 64)
    assert len(g) == 1 and g[0, 0].window.width == 256


@pytest.mark.parametrize("tile,overlap", [(64, 16), (256, 64), (128, 0), (64, 63), (32, 5)])
def test_weights_positive_smooth_and_partition_of_unity(tile: int, overlap: int) -> None:
    w = blend_weights(tile, overlap)
    assert w.shape == (tile, tile) and w.dtype == np.float32
    assert (w > 0).all() and w.min() >= EPSILON * EPSILON * 0.99
    if overlap * 2 <= tile:
        assert w[tile // 2, tile // 2] == 1.0
    # tiles one step apart: their 1-D weights over the shared band sum to 1
    step = tile - overlap
    p = w[tile // 2] if overlap * 2 <= tile else None
    if p is not None and overlap:
        np.testing.assert_allclose(p[step:] + p[:overlap], 1.0, atol=2 * EPSILON)
        assert np.abs(np.diff(p)).max() <= 1.0 / max(overlap - 2 * (overlap // 4), 1) * 1.6  # a ramp, not a step


def test_grid_weights_never_zero_over_scene() -> None:
    """The summed weight is > 0 everywhere, at the scene borders included."""
    h, w, tile, overlap = 300, 270, 64, 16
    g = TileGrid(h, w, tile, overlap)
    tot = np.zeros((h + tile, w + tile))
    for t in g:
        tot[t.row : t.row + tile, t.col : t.col + tile] += g.weights(t)
    assert (tot[:h, :w] > 0).all()
    # every pixel is covered by weights summing to 1 (no bias between tiles), from the top and
    # left edges, where the first tiles weigh 1 (theirs is the scene's edge), to where the
    # last tiles run past the scene
    np.testing.assert_allclose(tot[: h - tile, : w - tile], 1.0, atol=1e-5)
    first, inner = g.weights(g[0, 0]), g.weights(g[1, 1])
    assert (first[:overlap, :overlap] == 1).all() and inner[0, 0] == EPSILON * EPSILON
    np.testing.assert_array_equal(first[-overlap:, -overlap:], inner[-overlap:, -overlap:])
    np.testing.assert_array_equal(g.weights(), inner)


def test_bad_options() -> None:
    with pytest.raises(OptionError, match="multiple of the model's stride 16"):
        check_options(100, 16, 8, stride=16)
    with pytest.raises(OptionError, match="at least the model's stride"):
        check_options(8, 0, 8, stride=16)
    with pytest.raises(OptionError, match="smaller than --tile"):
        check_options(64, 64)
    with pytest.raises(OptionError, match="0 or more"):
        check_options(64, -1)
    with pytest.raises(OptionError, match="--batch-size 0"):
        check_options(64, 16, 0)
    assert OptionError.exit_code == 2


@pytest.mark.parametrize("side", [2048, 8192, 16384, 100_000])
def test_default_tile_holds_about_one_model_call_whatever_the_scene(side: int) -> None:
    """A tile goes through the model whole: however large the scene, the default tile (the
    default VAE's halo 32 and stride 8) is no larger than about one model call's pixels."""
    tile, _ = default_tiling(64, 32, 8, side, side)
    assert tile * tile <= 1.15 * BATCH_PIXELS
