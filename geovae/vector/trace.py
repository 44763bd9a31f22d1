"""Tracing: one block of a label raster -> polygon pieces in pixel coordinates.

``rasterio.features.shapes`` traces the regions of one block; their vertices are exact
integers in the scene's pixel coordinates (column, row), so the pieces of one region in two
blocks meet on bit-identical coordinates and join exactly (:mod:`geovae.vector.join`).
Each piece carries the sums and counts of the bands averaged per polygon (:data:`NSTATS`
columns), so the means of joined pieces are exact.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from itertools import chain

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window

__all__ = ["NSTATS", "Pieces", "block_pieces", "block_rows", "mean"]

#: Sum and count of confidence, uncertainty and the anomaly flag per piece.
NSTATS = 6


def block_rows(width: int, height: int, block: int) -> Iterator[list[Window]]:
    """Rows of block windows, top to bottom; the last row and column may be smaller."""
    for row_off in range(0, height, block):
        h = min(block, height - row_off)
        yield [Window(col_off, row_off, min(block, width - col_off), h) for col_off in range(0, width, block)]


class Pieces:
    """Column store of polygons in pixel coordinates with their key and (sum, count) stats."""

    def __init__(self) -> None:
        self.geoms: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.stats: list[np.ndarray] = []  # (n, NSTATS): sum and count of each averaged band

    def add(self, geoms: np.ndarray, keys: np.ndarray, stats: np.ndarray) -> None:
        if len(geoms):
            self.geoms.append(geoms)
            self.keys.append(keys)
            self.stats.append(stats)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.geoms:
            return np.empty(0, dtype=object), np.empty(0, dtype=np.int64), np.empty((0, NSTATS))
        out = np.concatenate(self.geoms), np.concatenate(self.keys), np.concatenate(self.stats)
        self.geoms, self.keys, self.stats = [], [], []
        return out


def block_pieces(
    classes: np.ndarray,
    valid: np.ndarray,
    window: Window,
    connectivity: int,
    conf: np.ndarray | None,
    unc: np.ndarray | None,
    anom: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polygonise one block; return pieces in global pixel coordinates, classes and stats.

    ``conf``, ``unc`` and ``anom`` (1 where the reconstruction error is above the model's
    threshold, 0 below, NaN at nodata) are summed and counted per piece, so that joined
    pieces' means are exact.
    """
    to_pixels = Affine.translation(window.col_off, window.row_off)
    # Building shapely objects one GeoJSON dict at a time dominates the run time; gathering
    # all rings' vertices first and building every polygon in one vectorised call does not.
    # The vertices go into a flat array of doubles (16 bytes a vertex) rather than a list
    # of the (x, y) tuples shapes() made (over 100 bytes a vertex, a block's worth at once).
    coords = array("d")
    add_coords = coords.extend
    ring_ends: list[int] = [0]
    poly_ends: list[int] = [0]
    cls: list[int] = []
    for geom, value in rasterio.features.shapes(classes, mask=valid, connectivity=connectivity, transform=to_pixels):
        for ring in geom["coordinates"]:
            add_coords(chain.from_iterable(ring))
            ring_ends.append(len(coords) >> 1)
        poly_ends.append(len(ring_ends) - 1)
        cls.append(int(value))
    cls_arr = np.array(cls, dtype=np.int64)
    if not cls:
        return np.empty(0, dtype=object), cls_arr, np.zeros((0, NSTATS))
    xy = np.frombuffer(coords, dtype=np.float64).reshape(-1, 2)
    rings = np.asarray(ring_ends, dtype=np.int64)
    polys = np.asarray(poly_ends, dtype=np.int64)
    garr = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, (rings, polys))
    bands = [(k, band) for k, band in ((0, conf), (2, unc), (4, anom)) if band is not None]
    if not bands:
        return garr, cls_arr, np.zeros((len(garr), NSTATS))
    marks = _run_starts(xy, rings, polys, classes, valid, cls_arr, window)
    return garr, cls_arr, _piece_stats(marks, valid, bands, len(garr))


def _run_starts(
    xy: np.ndarray,
    ring_ends: np.ndarray,
    poly_ends: np.ndarray,
    classes: np.ndarray,
    valid: np.ndarray,
    cls: np.ndarray,
    window: Window,
) -> np.ndarray:
    """Where each piece's runs of pixels start in one block: 1 + the piece's index at the
    first pixel of every run, 0 elsewhere (:func:`_piece_stats` carries them along rows).

    Read off the pieces' own rings instead of rasterising them again: in every row, a run
    of one piece's pixels starts at a vertical edge of that piece with the piece on its
    right (pixel (row, x) holds the piece's class; the pixel on the left cannot, or it would
    be the same region).
    """
    h, w = classes.shape
    n_rings = len(ring_ends) - 1
    ring_of_pt = np.repeat(np.arange(n_rings), np.diff(ring_ends))
    piece_of_ring = np.repeat(np.arange(len(poly_ends) - 1), np.diff(poly_ends))
    x = xy[:, 0] - window.col_off
    y = xy[:, 1] - window.row_off
    # Vertical edges: consecutive vertices of one ring with the same x.
    seg = np.flatnonzero((ring_of_pt[:-1] == ring_of_pt[1:]) & (x[:-1] == x[1:]) & (y[:-1] != y[1:]))
    col = x[seg].astype(np.int64)
    top = np.minimum(y[seg], y[seg + 1]).astype(np.int64)
    length = np.abs(y[seg + 1] - y[seg]).astype(np.int64)
    piece = piece_of_ring[ring_of_pt[seg]]
    # The piece lies on the edge's right along the whole edge, or on its left along all of it.
    inside = col < w
    c_in = np.minimum(col, w - 1)
    starts = inside & valid[top, c_in] & (classes[top, c_in] == cls[piece])
    col, top, length, piece = col[starts], top[starts], length[starts], piece[starts]
    # One mark per row of each edge.
    offsets = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    marks = np.zeros((h, w), dtype=np.int32)
    marks[np.repeat(top, length) + offsets, np.repeat(col, length)] = np.repeat(piece + 1, length)
    return marks


#: Rows of a block labelled and summed at a time by :func:`_piece_stats`. Whole-block label,
#: mask and float64 weight arrays would be alive at once in the polygon worker, several times
#: an output block's size while the model runs beside it (peak memory, issue 29).
STAT_ROWS = 128


def _piece_stats(marks: np.ndarray, valid: np.ndarray, bands: list[tuple[int, np.ndarray]], n: int) -> np.ndarray:
    """Sum and count of each band's finite values over each of the ``n`` pieces.

    Carrying each run start (:func:`_run_starts`) to the right along its row gives every
    valid pixel its piece, exactly as rasterising the pixel-exact pieces would; this is done,
    and the pixels summed, :data:`STAT_ROWS` rows at a time.

    Args:
        marks: the block's run starts.
        valid: the block's valid pixels.
        bands: ``(column, band)``: the band's sum goes to ``column`` of the result and its
            count to ``column + 1``.
        n: the number of pieces.

    Returns:
        ``(n, NSTATS)`` sums and counts (zero in the columns of no band).
    """
    h, w = marks.shape
    out = np.zeros((n + 1, NSTATS))
    cols = np.arange(w, dtype=np.int32)
    for r0 in range(0, h, STAT_ROWS):
        rows = slice(r0, r0 + STAT_ROWS)
        m = marks[rows]
        last = np.where(m > 0, cols, 0)
        np.maximum.accumulate(last, axis=1, out=last)
        ids = np.take_along_axis(m, last, axis=1)
        ids[~valid[rows]] = 0
        ids_flat = ids.ravel()
        for k, band in bands:
            values = band[rows].ravel()
            ok = np.isfinite(values) & (ids_flat > 0)
            lab = ids_flat[ok]
            out[:, k] += np.bincount(lab, weights=values[ok], minlength=n + 1)
            out[:, k + 1] += np.bincount(lab, minlength=n + 1)
    return out[1:]


def mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """sum / count, NaN (written as null) where a polygon has no valid pixel."""
    out = np.full(len(sums), np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out
