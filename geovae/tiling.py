"""The tile grid over a scene and the weights that blend overlapping tiles.

Tiles have origins on a regular grid of step ``S = tile - overlap`` starting at (0, 0). The
last row and column of tiles run past the scene where it is not a multiple of the step; the
pipeline pads them (never drops or shifts them), so every pixel is covered, the right and
bottom edges included, and a scene smaller than one tile is one padded tile. Keeping the
origins on one regular grid is what lets :mod:`geovae.blend` stream output blocks.

Blending weights (:func:`blend_weights`) are a separable profile over the tile:

* 1 in the tile's core;
* a small positive floor (``EPSILON``) on the outer ``margin`` pixels of each overlap band,
  where a convolutional model sees the tile border (zero padding) and its output is not
  like an untiled pass: the model's halo (:mod:`geovae.model.halo`), measured once per model;
  ``overlap // 4`` for a model whose halo is unknown;
* a smooth raised-cosine ramp across the rest of the overlap band, so neighbouring tiles
  hand over without a visible seam (the two ramps sum to 1).

The floor is never zero: a pixel at the scene border that only one tile sees gets exactly that
tile's value, and no pixel is ever left without a prediction. The first row and column of
tiles have no floor or ramp on their top and left sides, which are the scene's edge
(:meth:`TileGrid.weights`): there every tiling, and an untiled pass, sees the same edge. With
``overlap > 2 * halo`` every blended pixel comes from tiles that see it as an untiled pass would
(to the halo's tolerance), so tiling is invisible by construction, at the scene's edges too
(the last tiles run a halo past the right and bottom edges, see ``TileGrid._count``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from geovae.errors import OptionError

__all__ = ["EPSILON", "Tile", "TileGrid", "blend_weights", "check_options", "default_batch_size", "default_tiling"]

#: Weight of the outer quarter of an overlap band: small, but never zero.
EPSILON = 1e-6


#: Largest tile the defaults choose. One tile goes through the model whole, so its activations
#: are the largest single part of a run's memory (about 380 MiB for a 752² tile of the default
#: VAE on a CPU, 600 MiB for 1008²), and a large scene picks the largest tile allowed: the cap
#: bounds peak memory whatever the scene's size. At 768 a tile holds about
#: :data:`BATCH_PIXELS`, one model call's worth; a large scene predicts about 4 % more pixels
#: (overlap) than at 1024.
MAX_DEFAULT_TILE = 768
#: Pixels per model call the default batch size aims at (8 tiles of 256²).
BATCH_PIXELS = 8 * 256 * 256


def default_tiling(
    tile_size: int,
    halo: int | None,
    stride: int = 1,
    height: int | None = None,
    width: int | None = None,
    tile: int | None = None,
) -> tuple[int, int]:
    """The tile and overlap a model runs with when the user does not give them.

    With a known halo the overlap covers it on both sides plus a 16-pixel ramp, and the tile is
    the one (a multiple of the stride, from the model's training tile up to
    :data:`MAX_DEFAULT_TILE`) that predicts the fewest pixels for this scene: large tiles waste
    less on overlap, but a tile much larger than the scene wastes more on padding. A model
    without a known halo keeps the old rule: its training tile and a quarter of it.

    Args:
        tile_size: the model's training tile.
        halo: the model's halo, or None when unknown.
        stride: the model's stride.
        height, width: the scene's size (None: as if it were very large).
        tile: a tile the user chose (then only the overlap is chosen).

    Returns:
        ``(tile, overlap)``.
    """
    if halo is None:
        t = int(tile if tile is not None else tile_size)
        return t, t // 4
    overlap = 2 * int(halo) + 16
    if tile is not None:
        return int(tile), min(overlap, max(int(tile) - stride, 0))
    lo = max(int(tile_size), -(-(2 * overlap + stride) // stride) * stride)
    hi = max(lo, MAX_DEFAULT_TILE // stride * stride)
    if height is None or width is None:
        return hi, overlap
    best = None
    for t in range(lo, hi + 1, stride):
        grid = TileGrid(height, width, t, overlap, margin=halo)
        cost = len(grid) * t * t
        if best is None or cost < best[0]:
            best = (cost, t)
    assert best is not None
    return best[1], overlap


def default_batch_size(tile: int) -> int:
    """Tiles per model call: about :data:`BATCH_PIXELS` pixels, at least one tile."""
    return max(1, BATCH_PIXELS // (tile * tile))


def check_options(tile: int, overlap: int, batch_size: int = 1, stride: int = 1) -> None:
    """Validate tiling options before any work is done.

    Args:
        tile: tile side in pixels.
        overlap: overlap between neighbouring tiles in pixels.
        batch_size: tiles per model call.
        stride: the model's stride (input sides must be multiples of it).

    Raises:
        OptionError: if an option is out of range or inconsistent with the model.
    """
    stride = max(int(stride), 1)
    if int(tile) != tile or tile < stride or tile < 1:
        raise OptionError(f"--tile {tile}: must be at least the model's stride ({stride}) pixels; use a larger tile")
    if tile % stride:
        raise OptionError(
            f"--tile {tile}: must be a multiple of the model's stride {stride}; "
            f"use {max(stride, tile // stride * stride)} or {(tile // stride + 1) * stride}"
        )
    if int(overlap) != overlap or overlap < 0:
        raise OptionError(f"--overlap {overlap}: must be 0 or more pixels")
    if overlap >= tile:
        raise OptionError(f"--overlap {overlap}: must be smaller than --tile {tile}; try {tile // 4}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise OptionError(f"--batch-size {batch_size}: must be 1 or more")


@dataclass(frozen=True)
class Tile:
    """One tile: its grid position and its window (which may run past the scene).

    Attributes:
        i: tile row in the grid.
        j: tile column in the grid.
        row: first pixel row (``i * step``).
        col: first pixel column (``j * step``).
        size: tile side in pixels.
    """

    i: int
    j: int
    row: int
    col: int
    size: int

    @property
    def window(self) -> Window:
        return Window(self.col, self.row, self.size, self.size)


class TileGrid:
    """Tiles of ``tile`` x ``tile`` pixels, ``overlap`` pixels apart, covering a scene.

    Args:
        height: scene height in pixels.
        width: scene width in pixels.
        tile: tile side in pixels (a multiple of the model's stride).
        overlap: pixels shared by neighbouring tiles (0 <= overlap < tile). A run checks
            both once, when it resolves its options (:func:`check_options`).
        margin: pixels at a tile's edge the blend leaves out (the model's halo); None for
            ``overlap // 4``.

    Raises:
        OptionError: an empty scene.
    """

    def __init__(self, height: int, width: int, tile: int, overlap: int, margin: int | None = None):
        # An overlap too small for the halo still blends (with a warning from the caller): the
        # margin left out then shrinks so that the ramp keeps at least one pixel.
        self.margin = None if margin is None else min(int(margin), max((int(overlap) - 1) // 2, 0))
        if height < 1 or width < 1:
            raise OptionError(f"scene of {height}x{width} pixels: nothing to tile")
        self.height = int(height)
        self.width = int(width)
        self.tile = int(tile)
        self.overlap = int(overlap)
        self.step = self.tile - self.overlap
        self.rows = self._count(self.height)
        self.cols = self._count(self.width)

    def _count(self, n: int) -> int:
        # The smallest count whose last tile reaches the far edge: (count-1)*step + tile >= n,
        # and with a margin, reaches that far past it: a pixel at the scene's right or bottom
        # edge then sees band-mean fill out to the halo in every tiling (and at the left and
        # top, the scene's edge is every tiling's first tile's edge), so tilings agree there too.
        return max(1, math.ceil((n + (self.margin or 0) - self.tile) / self.step) + 1)

    def __len__(self) -> int:
        return self.rows * self.cols

    def __iter__(self) -> Iterator[Tile]:
        for i in range(self.rows):
            for j in range(self.cols):
                yield self[i, j]

    def __getitem__(self, ij: tuple[int, int]) -> Tile:
        i, j = ij
        if not (0 <= i < self.rows and 0 <= j < self.cols):
            raise IndexError(f"tile {ij} outside a {self.rows}x{self.cols} grid")
        return Tile(i, j, i * self.step, j * self.step, self.tile)

    def weights(self, tile: Tile | None = None) -> np.ndarray:
        """The (tile, tile) float32 blending weights (see :func:`blend_weights`) of ``tile``,
        or of a tile away from the scene's top and left edges when None.

        A tile of the first row or column has the scene's top or left edge as its own edge,
        as every tiling and an untiled pass have: its pixels there are trustworthy and
        weigh 1 instead of the floor. Otherwise the second tile's floor, whose edge lies a
        step into the scene, would blend in as much as the first tile's: two tilings with
        different steps would then differ within a halo of the top and left edges (by up to
        0.3 in a class probability, for a parcel model on real NDVI).
        """
        if tile is None:
            return blend_weights(self.tile, self.overlap, self.margin)
        return blend_weights(self.tile, self.overlap, self.margin, first_row=tile.i == 0, first_col=tile.j == 0)

    def __repr__(self) -> str:
        return (
            f"TileGrid({self.height}x{self.width}, tile={self.tile}, overlap={self.overlap}: "
            f"{self.rows}x{self.cols} tiles)"
        )


def _profile(tile: int, overlap: int, margin: int | None = None, first: bool = False) -> np.ndarray:
    """1-D weights along one tile axis: floor, cosine ramp, 1, ramp, floor (``first``: 1 up to
    the trailing ramp, for a tile whose leading edge is the scene's)."""
    w = np.ones(tile, dtype=np.float64)
    if overlap == 0:
        return w.astype(np.float32)
    # An overlap too small for the halo still blends: the ramp keeps at least one pixel.
    floor = overlap // 4 if margin is None else min(int(margin), (overlap - 1) // 2)
    ramp = overlap - 2 * floor
    # Raised cosine sampled at pixel centres: r[k] + r[ramp-1-k] == 1, so two neighbours'
    # ramps, which run over the same pixels in opposite directions, sum to exactly 1.
    k = np.arange(ramp, dtype=np.float64)
    r = np.sin(0.5 * np.pi * (k + 0.5) / ramp) ** 2
    r = np.maximum(r, EPSILON)
    lead = np.concatenate([np.full(floor, EPSILON), r, np.ones(floor)])  # first `overlap` pixels
    if not first:
        w[:overlap] = lead
    w[tile - overlap :] = np.minimum(w[tile - overlap :], lead[::-1])
    return w.astype(np.float32)


def blend_weights(
    tile: int, overlap: int, margin: int | None = None, *, first_row: bool = False, first_col: bool = False
) -> np.ndarray:
    """Blending weights of one tile, (tile, tile) float32, all > 0.

    Args:
        tile: tile side in pixels.
        overlap: overlap between neighbouring tiles in pixels.
        margin: pixels at the tile's edge left out of the blend (the model's halo); None
            for ``overlap // 4``.
        first_row, first_col: the tile is in the grid's first row (column): its top (left)
            edge is the scene's, where its pixels weigh 1 (see :meth:`TileGrid.weights`).

    Returns:
        The separable weight array; see the module docstring for its shape and why.
    """
    return np.outer(_profile(tile, overlap, margin, first_row), _profile(tile, overlap, margin, first_col))
