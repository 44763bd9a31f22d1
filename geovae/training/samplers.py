"""Where training patches come from: the spatial split and a sampler for sparse labels.

:func:`split_regions` cuts a scene into a training and a validation part along one side, on
the pixel grid. :class:`LabelledPatchSampler` is a TorchGeo
:class:`~torchgeo.samplers.SpatialSampler` whose every patch holds labelled pixels, over the
cells that :func:`labelled_cells` finds without holding the label raster in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import rasterio
import rasterio.windows
import shapely
import torch
from torchgeo.datasets import GeoDataset
from torchgeo.samplers import SpatialSampler

from geovae.choices import VAL_SIDES, ValSide
from geovae.errors import LabelsError, OptionError
from geovae.scene import open_raster

__all__ = ["VAL_SIDES", "LabelledPatchSampler", "labelled_cells", "split_regions"]


def split_regions(
    bounds: tuple[float, float, float, float],
    res: tuple[float, float],
    val_fraction: float,
    val_side: ValSide = "east",
) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float] | None]:
    """Split a scene's bounds into a training and a validation box along one side.

    The cut lies on the pixel grid, so samplers keep patches pixel-aligned.

    Args:
        bounds: (left, bottom, right, top).
        res: pixel size (x, y).
        val_fraction: share of the scene's width (east/west) or height (north/south) kept
            for validation; 0 for no validation.
        val_side: ``"east"``, ``"west"``, ``"north"`` or ``"south"``.

    Returns:
        ``(train_box, val_box or None)``.

    Raises:
        OptionError: if ``val_fraction`` is outside [0, 0.9] or ``val_side`` is unknown.
    """
    if not 0.0 <= val_fraction <= 0.9:
        raise OptionError(f"val_fraction {val_fraction}: must be between 0 (no validation) and 0.9")
    if val_side not in VAL_SIDES:
        raise OptionError(f"val_side {val_side!r}: choose one of {', '.join(VAL_SIDES)}")
    l, b, r, t = bounds
    if val_fraction == 0:
        return bounds, None
    if val_side in ("east", "west"):
        n = round((r - l) / res[0])
        k = max(1, round(n * val_fraction))
        if val_side == "east":
            cut = r - k * res[0]
            return (l, b, cut, t), (cut, b, r, t)
        cut = l + k * res[0]
        return (cut, b, r, t), (l, b, cut, t)
    n = round((t - b) / res[1])
    k = max(1, round(n * val_fraction))
    if val_side == "north":
        cut = t - k * res[1]
        return (l, b, r, cut), (l, cut, r, t)
    cut = b + k * res[1]
    return (l, cut, r, t), (l, b, r, cut)


def labelled_cells(
    labels: str | None,
    box: tuple[float, float, float, float],
    transform: Any,
    cell: int,
    ids: Sequence[int],
    *,
    shapes: Any = None,
) -> np.ndarray:
    """Boxes of the ``cell`` x ``cell``-pixel cells of ``box`` that hold at least one label.

    Memory is one cell grid plus one strip of label rows, whatever the scene's size.

    Args:
        labels: a label raster on the image's grid (or None with ``shapes``).
        box: (left, bottom, right, top) part of the scene, in CRS units.
        transform: the image's affine transform (north-up).
        cell: cell side in pixels.
        ids: class ids that count as labels.
        shapes: vector labels (shapely geometries in the image's CRS) instead of a raster.

    Returns:
        (N, 4) float array of (left, bottom, right, top) cell boxes, clipped to ``box``.
    """
    col0, row1 = ~transform @ (box[0], box[1])
    col1, row0 = ~transform @ (box[2], box[3])
    c0, r0 = math.floor(min(col0, col1) + 1e-6), math.floor(min(row0, row1) + 1e-6)
    c1, r1 = math.ceil(max(col0, col1) - 1e-6), math.ceil(max(row0, row1) - 1e-6)
    ny, nx = -(-(r1 - r0) // cell), -(-(c1 - c0) // cell)
    occ = np.zeros((ny, nx), bool)
    if shapes is not None:
        from rasterio.features import rasterize

        cell_tf = transform @ rasterio.Affine.translation(c0, r0) @ rasterio.Affine.scale(cell)
        geoms = [g for g in shapes if g is not None and not g.is_empty]
        if geoms:
            occ = rasterize(geoms, out_shape=(ny, nx), transform=cell_tf, all_touched=True, dtype="uint8") > 0
    else:
        assert labels is not None
        wanted = np.asarray(sorted(ids))
        with open_raster(labels, "labels") as src:
            strip = max(cell, (4096 // cell) * cell)
            for top in range(r0, r1, strip):
                h = min(strip, r1 - top)
                a = src.read(1, window=rasterio.windows.Window(c0, top, c1 - c0, h), boundless=True, fill_value=0)
                lab = np.isin(a, wanted)
                pad = (-h % cell, -(c1 - c0) % cell)
                lab = np.pad(lab, ((0, pad[0]), (0, pad[1])))
                cells = lab.reshape(lab.shape[0] // cell, cell, nx, cell).any(axis=(1, 3))
                occ[(top - r0) // cell : (top - r0) // cell + cells.shape[0]] |= cells
    rows, cols = np.nonzero(occ)
    out = []
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        x0, y0 = transform @ (c0 + c * cell, r0 + r * cell)
        x1, y1 = transform @ (min(c0 + (c + 1) * cell, c1), min(r0 + (r + 1) * cell, r1))
        out.append(
            (max(min(x0, x1), box[0]), max(min(y0, y1), box[1]), min(max(x0, x1), box[2]), min(max(y0, y1), box[3]))
        )
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


class LabelledPatchSampler(SpatialSampler):
    """Random patches that each hold labelled pixels: for sparse labels (a few polygons).

    A TorchGeo :class:`~torchgeo.samplers.SpatialSampler` (random strategy). TorchGeo's own
    ``RandomPatchSampler`` with the labelled cells as ``roi`` would not do: it erodes the
    region by half a patch, which erases cells smaller than a patch.

    Each patch picks one labelled cell (see :func:`labelled_cells`; cells are at most a patch
    wide) uniformly at random and covers it whole, at a random whole-pixel position inside
    ``roi``, so every patch holds labelled pixels. Every labelled region is visited about
    equally often per cell it touches, and most of each patch is the unlabelled context
    around it.

    Args:
        dataset: the labelled dataset (image joined with labels).
        size: patch side in pixels.
        length: patches per epoch.
        roi: (left, bottom, right, top) part to sample from (the training part).
        cells: (N, 4) labelled cell boxes inside ``roi``; N >= 1.
        generator: torch random generator (seeded for reproducibility).
    """

    def __init__(
        self,
        dataset: GeoDataset,
        size: int,
        length: int,
        roi: tuple[float, float, float, float],
        cells: np.ndarray,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(dataset, roi=shapely.box(*roi))
        if len(cells) == 0:
            raise LabelsError("no labelled pixels in the training part; check the labels and --classes")
        self.rx, self.ry = float(dataset.res[0]), float(dataset.res[1])
        self.size = int(size)
        self.length = int(length)
        self.box = roi
        self.cells = torch.as_tensor(cells, dtype=torch.float64)
        self.generator = generator

    @property
    def strategy(self) -> Literal["random"]:
        return "random"

    def __iter__(self) -> Any:
        left, bottom, right, top = self.box
        w, h = self.size * self.rx, self.size * self.ry
        g = self.generator

        def pick(lo: float, hi: float) -> int:
            # A whole-pixel offset in [lo, hi] (pixel units): reads stay on the image's grid.
            a, b = math.ceil(lo - 1e-6), math.floor(hi + 1e-6)
            return a if b <= a else int(torch.randint(a, b + 1, (1,), generator=g))

        for _ in range(self.length):
            i = int(torch.randint(len(self.cells), (1,), generator=g))
            cx0, cy0, cx1, cy1 = self.cells[i].tolist()
            # The patch covers the whole cell (so at least one labelled pixel), at a random
            # place around it, inside the region.
            kx = pick((max(cx1 - w, left) - left) / self.rx, (min(cx0, right - w) - left) / self.rx)
            ky = pick((top - min(cy0 + h, top)) / self.ry, (top - max(cy1, bottom + h)) / self.ry)
            x0, y1 = left + kx * self.rx, top - ky * self.ry
            yield slice(x0, x0 + w), slice(y1 - h, y1)

    def __len__(self) -> int:
        return self.length
