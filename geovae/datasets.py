"""TorchGeo glue: the training scene, its labels and unlabelled scenes as TorchGeo datasets.

Training reads through TorchGeo, not around it: the image and a label raster are
:class:`~torchgeo.datasets.RasterDataset` instances joined by an
:class:`~torchgeo.datasets.IntersectionDataset`; vector labels are rasterised on the fly by a
:class:`~torchgeo.datasets.VectorDataset`; patches come from TorchGeo samplers
(:class:`~torchgeo.samplers.RandomGeoSampler` for training,
:class:`~torchgeo.samplers.GriddedPatchSampler` for validation) and are collated by
:func:`~torchgeo.datasets.stack_samples`. :class:`SceneDataModule` wires all of it into a
TorchGeo :class:`~torchgeo.datamodules.GeoDataModule`.

What geovae adds is the checking a user needs before minutes of training: labels on the
image's grid, class ids that ``classes`` names, labelled pixels where training looks, and
scene-wide band statistics computed block by block over valid pixels only.

Conventions:
    * Label value 0 and the label raster's nodata value mean "unlabelled" unless ``classes``
      names 0. Unlabelled pixels become ``ignore_index`` in the mask.
    * A pixel of the image is valid when at least one band differs from the image's nodata
      value (GDAL's dataset mask for a nodata-tagged raster). A single band equal to nodata
      inside a valid pixel (a per-band gap, such as Landsat-7's B7 stripes) is replaced by
      that band's scene mean before the model sees it.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.windows
import shapely
import torch
from lightning.pytorch.utilities import CombinedLoader
from rasterio.crs import CRS
from torch import Tensor
from torch.utils.data import DataLoader
from torchgeo.datamodules import GeoDataModule
from torchgeo.datasets import (
    GeoDataset,
    IntersectionDataset,
    RasterDataset,
    VectorDataset,
    stack_samples,
)
from torchgeo.samplers import GeoSampler, GriddedPatchSampler, RandomGeoSampler, SpatialSampler

from geovae.errors import LabelsError, OptionError, SceneError
from geovae.classes import ClassSpec, parse_classes

log = logging.getLogger("geovae.datasets")

#: Mask value of pixels that carry no label (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

VAL_SIDES = ("east", "west", "north", "south")
SAMPLERS = ("random", "labelled")


def _check_file(path: str | os.PathLike[str], what: str) -> str:
    p = str(path)
    if "://" in p or p.startswith("/vsi"):
        return p  # remote or GDAL virtual paths are checked when opened
    if not Path(p).exists():
        raise SceneError(f"{what} {p}: no such file; check the path")
    if Path(p).is_dir():
        raise SceneError(f"{what} {p}: is a folder; give the raster file itself")
    return p


def _open(path: str, what: str) -> rasterio.DatasetReader:
    _check_file(path, what)
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        first = str(e).splitlines()[0] if str(e) else "unreadable"
        raise SceneError(f"{what} {path}: cannot be read as a raster ({first}); give a GeoTIFF or other GDAL raster") from None


# ----------------------------------------------------------------------------- scene facts
@dataclass
class SceneFacts:
    """What training needs to know about the training image, read once up front.

    Attributes:
        path: the image path.
        count: number of bands.
        crs: the image CRS.
        res: pixel size (x, y) in CRS units.
        bounds: (left, bottom, right, top) in CRS units.
        width: width in pixels.
        height: height in pixels.
        nodata: the nodata value, or None.
        band_names: band descriptions, when every band has one.
    """

    path: str
    count: int
    crs: CRS
    res: tuple[float, float]
    bounds: tuple[float, float, float, float]
    width: int
    height: int
    nodata: float | None
    band_names: list[str] | None


def describe_image(path: str | os.PathLike[str]) -> SceneFacts:
    """Read the facts about a training image that training depends on.

    Args:
        path: the image.

    Returns:
        Its :class:`SceneFacts`.

    Raises:
        SceneError: if it is missing, unreadable or not georeferenced.
    """
    p = str(path)
    with _open(p, "image") as src:
        if src.crs is None or src.transform.is_identity:
            raise SceneError(f"image {p}: has no CRS or geotransform; georeference it (e.g. gdal_edit.py -a_srs -a_ullr)")
        if src.transform.b != 0 or src.transform.d != 0:
            raise SceneError(f"image {p}: has a rotated geotransform; warp it north-up first (gdalwarp)")
        descr = list(src.descriptions)
        return SceneFacts(
            path=p, count=src.count, crs=src.crs, res=(abs(src.res[0]), abs(src.res[1])),
            bounds=tuple(src.bounds), width=src.width, height=src.height,  # type: ignore[arg-type]
            nodata=src.nodata, band_names=descr if all(descr) else None,
        )


# ----------------------------------------------------------------------------- grids and labels
def check_same_grid(image: SceneFacts, labels_path: str) -> None:
    """Check that a label raster lies on the image's pixel grid.

    geovae does not reproject labels: resampling class ids silently moves class borders by
    up to a pixel, so a mismatch is an error that names the fix instead.

    Args:
        image: facts of the training image.
        labels_path: the label raster.

    Raises:
        LabelsError: if the CRS, pixel size or pixel alignment differ, the labels have
            more than one band, or the two do not overlap.
    """
    fix = (f"resample them onto the image grid, e.g. gdalwarp -t_srs {image.crs.to_string()} "
           f"-tr {image.res[0]:g} {image.res[1]:g} -tap -r near LABELS OUT.tif")
    with _open(labels_path, "labels") as src:
        if src.count != 1:
            raise LabelsError(f"labels {labels_path}: has {src.count} bands; give a single-band class raster")
        if src.crs is None:
            raise LabelsError(f"labels {labels_path}: has no CRS; {fix}")
        if src.crs != image.crs:
            raise LabelsError(f"labels {labels_path}: CRS {src.crs.to_string()} differs from the image's "
                              f"{image.crs.to_string()}; {fix}")
        rx, ry = abs(src.res[0]), abs(src.res[1])
        if not (math.isclose(rx, image.res[0], rel_tol=1e-6) and math.isclose(ry, image.res[1], rel_tol=1e-6)):
            raise LabelsError(f"labels {labels_path}: pixel size {rx:g}x{ry:g} differs from the image's "
                              f"{image.res[0]:g}x{image.res[1]:g}; {fix}")
        if src.transform.b != 0 or src.transform.d != 0:
            raise LabelsError(f"labels {labels_path}: has a rotated geotransform; {fix}")
        dx = (src.bounds.left - image.bounds[0]) / image.res[0]
        dy = (src.bounds.top - image.bounds[3]) / image.res[1]
        if abs(dx - round(dx)) > 1e-3 or abs(dy - round(dy)) > 1e-3:
            raise LabelsError(f"labels {labels_path}: pixels are offset by a fraction of a pixel from the image's; {fix}")
        l, b, r, t = src.bounds
        if r <= image.bounds[0] or l >= image.bounds[2] or t <= image.bounds[1] or b >= image.bounds[3]:
            raise LabelsError(f"labels {labels_path}: do not overlap the image; give the labels of this scene")


def label_counts(path: str, bounds: tuple[float, float, float, float] | None = None) -> tuple[dict[int, int], float | None]:
    """Count each label value of a single-band raster, block by block.

    Args:
        path: the label raster.
        bounds: only count inside these (left, bottom, right, top) CRS bounds.

    Returns:
        ``({value: pixel count}, nodata)``; the nodata value's pixels are not counted.

    Raises:
        LabelsError: if the raster holds non-integer values.
    """
    counts: dict[int, int] = {}
    with _open(path, "labels") as src:
        nd = src.nodata
        if bounds is not None:
            full = rasterio.windows.Window(0, 0, src.width, src.height)
            try:
                region = rasterio.windows.from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
                region = region.intersection(full)
            except rasterio.errors.WindowError:
                return {}, nd
        else:
            region = None
        for _, win in src.block_windows(1):
            if region is not None:
                try:
                    win = win.intersection(region)
                except rasterio.errors.WindowError:
                    continue
            a = src.read(1, window=win)
            if np.issubdtype(a.dtype, np.floating):
                finite = a[np.isfinite(a)]
                if finite.size and not np.array_equal(finite, np.round(finite)):
                    raise LabelsError(f"labels {path}: holds non-integer values; give a class-id raster")
            if nd is not None and not math.isnan(nd):
                a = a[a != nd]
            else:
                a = a.ravel()
            if np.issubdtype(a.dtype, np.floating):
                a = a[np.isfinite(a)]
            vals, cnt = np.unique(a.astype(np.int64), return_counts=True)
            for v, c in zip(vals.tolist(), cnt.tolist(), strict=True):
                counts[v] = counts.get(v, 0) + c
    return counts, nd


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
    c0, r0 = int(math.floor(min(col0, col1) + 1e-6)), int(math.floor(min(row0, row1) + 1e-6))
    c1, r1 = int(math.ceil(max(col0, col1) - 1e-6)), int(math.ceil(max(row0, row1) - 1e-6))
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
        with _open(labels, "labels") as src:
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
        out.append((max(min(x0, x1), box[0]), max(min(y0, y1), box[1]), min(max(x0, x1), box[2]), min(max(y0, y1), box[3])))
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

    def __init__(self, dataset: GeoDataset, size: int, length: int, roi: tuple[float, float, float, float],
                 cells: np.ndarray, generator: torch.Generator | None = None) -> None:
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
    def strategy(self) -> str:  # type: ignore[override]
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


def label_colors(path: str, ids: Sequence[int]) -> list[tuple[int, int, int]] | None:
    """Colours of ``ids`` from a label raster's colour table, or None if it has none."""
    with _open(path, "labels") as src:
        try:
            cmap = src.colormap(1)
        except ValueError:
            return None
    if not all(i in cmap for i in ids):
        return None
    return [tuple(int(v) for v in cmap[i][:3]) for i in ids]  # type: ignore[misc]


def resolve_classes(
    classes: str | Mapping[Any, Any] | None,
    present: Mapping[int, int],
    *,
    where: str,
    colors_from: str | None = None,
) -> ClassSpec:
    """Decide the model's classes from the user's specification and the labels' values.

    Value 0 is "unlabelled" unless ``classes`` names it.

    Args:
        classes: the user's specification (see :func:`parse_classes`), or None for every
            non-zero value present in the labels.
        present: ``{label value: pixel count}`` over the labels (nodata already left out).
        where: the labels' name, for messages.
        colors_from: a label raster whose colour table gives the colours.

    Returns:
        The :class:`ClassSpec`.

    Raises:
        LabelsError: if the labels hold class ids that ``classes`` does not name, or fewer
            than two classes remain.
    """
    if classes is None:
        named = {v: f"class {v}" for v in sorted(present) if v != 0}
    else:
        named = parse_classes(classes)
        unknown = sorted(v for v in present if v not in named and v != 0)
        if unknown:
            shown = ", ".join(f"{v} ({present[v]} px)" for v in unknown[:8])
            raise LabelsError(f"labels {where}: class ids {shown} are not named in --classes; "
                              f"add them (e.g. '{unknown[0]}:name') or set them to 0 (unlabelled)")
    if len(named) < 2:
        raise LabelsError(f"labels {where}: only {len(named)} class(es) found; a segmenter needs at least two classes")
    ids = list(named)
    colors = (label_colors(colors_from, ids) if colors_from else None) or []
    return ClassSpec(ids=ids, names=list(named.values()), colors=colors)


def vector_label_values(path: str, field_name: str | None, crs: CRS) -> Any:
    """Read a vector label file, checked, in ``crs``.

    Args:
        path: vector file (GeoPackage, GeoJSON, shapefile, GeoParquet).
        field_name: attribute holding the class (id or name).
        crs: CRS of the image, to compare bounds.

    Returns:
        The GeoDataFrame, reprojected to ``crs``.

    Raises:
        LabelsError: if the file cannot be read, the field is missing or there are no features.
    """
    import geopandas as gpd

    _check_file(path, "vector labels")
    try:
        gdf = gpd.read_parquet(path) if path.lower().endswith(".parquet") else gpd.read_file(path)
    except Exception as e:  # pyogrio raises several types for unreadable files
        raise LabelsError(f"vector labels {path}: cannot be read ({str(e).splitlines()[0]}); give a GPKG, GeoJSON or shapefile") from None
    if len(gdf) == 0:
        raise LabelsError(f"vector labels {path}: has no features; give labelled polygons")
    if not field_name:
        raise LabelsError(f"vector labels {path}: no --label-field given; name the attribute holding the class "
                          f"(one of: {', '.join(c for c in gdf.columns if c != 'geometry')})")
    if field_name not in gdf.columns:
        raise LabelsError(f"vector labels {path}: has no attribute {field_name!r}; use one of: "
                          f"{', '.join(c for c in gdf.columns if c != 'geometry')}")
    if gdf.crs is None:
        raise LabelsError(f"vector labels {path}: has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:XXXX)")
    return gdf.to_crs(crs)


# ----------------------------------------------------------------------------- TorchGeo datasets
class SceneImage(RasterDataset):
    """One or more image rasters as a TorchGeo dataset (``image`` key, float32)."""

    is_image = True
    filename_glob = "*"


class SceneLabels(RasterDataset):
    """A class raster as a TorchGeo dataset (``mask`` key, int64)."""

    is_image = False
    filename_glob = "*"


class VectorLabels(VectorDataset):
    """Vector labels rasterised on the fly by TorchGeo, with class names mapped to ids.

    Args:
        paths: the vector file(s).
        crs: CRS to rasterise in (the image's).
        res: pixel size to rasterise at (the image's).
        label_field: attribute holding the class id, or a class name listed in ``name_to_id``.
        name_to_id: class name -> id, for string attributes.
        transforms: sample transform.
    """

    filename_glob = "*"

    def __init__(self, paths: str | Sequence[str], crs: Any, res: tuple[float, float], label_field: str,
                 name_to_id: Mapping[str, int] | None = None, transforms: Any = None) -> None:
        self.name_to_id = dict(name_to_id or {})
        super().__init__(paths=paths, crs=crs, res=res, transforms=transforms, label_name=label_field)

    def get_label(self, feature: Any) -> int:
        """Class id of one feature (0 = not rendered)."""
        v = feature[self.label_name]
        if isinstance(v, str):
            return int(self.name_to_id.get(v, 0))
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return 0
        return int(v)


class RemapMask:
    """Sample transform: raw label values -> channel indices; everything else -> ignore.

    Args:
        lookup: ``{raster value: channel index}``.
        ignore_index: value for unlabelled pixels.
    """

    def __init__(self, lookup: Mapping[int, int], ignore_index: int = IGNORE_INDEX) -> None:
        self.max_id = max(lookup)
        self.min_id = min(min(lookup), 0)
        lut = torch.full((self.max_id - self.min_id + 1,), ignore_index, dtype=torch.long)
        for raw, idx in lookup.items():
            lut[raw - self.min_id] = idx
        self.lut = lut
        self.ignore_index = ignore_index

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        m = sample["mask"].long()
        inside = (m >= self.min_id) & (m <= self.max_id)
        out = torch.full_like(m, self.ignore_index)
        out[inside] = self.lut[m[inside] - self.min_id]
        sample["mask"] = out
        return sample


class IgnoreOutside:
    """Sample transform: labels outside a box become ``ignore_index``.

    Validation patches from :class:`~torchgeo.samplers.GriddedPatchSampler` are centred on
    the validation region and overhang it by up to half a patch; without this, pixels of the
    training region would be scored as validation.

    Args:
        box: (left, bottom, right, top) in CRS units.
        ignore_index: value for masked pixels.
    """

    def __init__(self, box: tuple[float, float, float, float], ignore_index: int = IGNORE_INDEX) -> None:
        self.box = box
        self.ignore_index = ignore_index

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        m = sample["mask"]
        b = sample["bounds"]  # [xmin, xmax, xres, ymin, ymax, yres, ...]
        h, w = m.shape[-2:]
        xres, yres = float(b[2]), float(b[5])
        xs = float(b[0]) + (torch.arange(w, dtype=torch.float64) + 0.5) * xres
        ys = float(b[4]) - (torch.arange(h, dtype=torch.float64) + 0.5) * yres
        l, bo, r, t = self.box
        inside = ((ys >= bo) & (ys <= t))[:, None] & ((xs >= l) & (xs <= r))[None, :]
        sample["mask"] = torch.where(inside, m, torch.full_like(m, self.ignore_index))
        return sample


class AddIgnoreMask:
    """Sample transform for unlabelled scenes: a mask that is ``ignore_index`` everywhere."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        img = sample["image"]
        sample["mask"] = torch.full(img.shape[-2:], self.ignore_index, dtype=torch.long)
        return sample


class Compose:
    """Apply sample transforms in order (picklable, for DataLoader workers)."""

    def __init__(self, *fns: Any) -> None:
        self.fns = [f for f in fns if f is not None]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for f in self.fns:
            sample = f(sample)
        return sample


# ----------------------------------------------------------------------------- regions
def split_regions(
    bounds: tuple[float, float, float, float],
    res: tuple[float, float],
    val_fraction: float,
    val_side: str = "east",
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


# ----------------------------------------------------------------------------- data module
class SceneDataModule(GeoDataModule):
    """A TorchGeo data module for one labelled scene, plus optional unlabelled scenes.

    Training patches are drawn at random inside the training part of the scene by
    :class:`~torchgeo.samplers.RandomGeoSampler`; validation patches tile the validation part
    with :class:`~torchgeo.samplers.GriddedPatchSampler`. With ``unlabeled`` scenes, every
    training step also gets a batch from them (via Lightning's
    :class:`~lightning.pytorch.utilities.CombinedLoader`) whose mask is all ``ignore_index``:
    those pixels train the reconstruction and KL terms only.

    Everything that can be wrong with the inputs is checked in ``__init__`` (files, grids,
    classes, labelled pixels), so a bad run fails before any training.

    Args:
        image: the training image (any GDAL raster).
        labels: a label raster on the image's grid (0 or its nodata = unlabelled).
        vector_labels: vector labels instead of ``labels``, rasterised by TorchGeo.
        label_field: attribute of ``vector_labels`` holding the class id (or class name).
        classes: ``"1:developed,5:forest"`` or a mapping; None for every id in the labels.
        unlabeled: extra scenes without labels (same band count) for semi-supervised training.
        tile: patch size in pixels.
        batch_size: patches per batch (and as many unlabelled ones per step).
        val_fraction: share of the scene held out for validation on the ``val_side``.
        val_side: side of the scene kept for validation.
        samples_per_epoch: training patches per epoch (default: 4x the number of
            non-overlapping tiles in the training part, rounded up to whole batches).
        num_workers: DataLoader worker processes.
        sampler: where training patches come from: ``"random"`` (TorchGeo's
            ``RandomGeoSampler`` over the training part) or ``"labelled"``
            (:class:`LabelledPatchSampler`: every patch holds labelled pixels; for sparse
            labels without unlabelled scenes, see docs/quality.md). Unlabelled scenes are
            always sampled at random.
        seed: seed of the random patch sampler.
        ignore_index: mask value of unlabelled pixels.

    Raises:
        SceneError, LabelsError, OptionError: for bad inputs (see the messages).
    """

    def __init__(
        self,
        image: str,
        labels: str | None = None,
        vector_labels: str | None = None,
        label_field: str | None = None,
        classes: str | dict[int, str] | None = None,
        unlabeled: Sequence[str] = (),
        tile: int = 64,
        batch_size: int = 16,
        val_fraction: float = 0.25,
        val_side: str = "east",
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        sampler: str = "random",
    ) -> None:
        super().__init__(SceneImage, batch_size=batch_size, patch_size=tile, length=samples_per_epoch,
                         num_workers=num_workers)
        if tile < 8:
            raise OptionError(f"tile {tile}: too small; use 32 or more")
        if batch_size < 1:
            raise OptionError(f"batch_size {batch_size}: must be at least 1")
        if sampler not in SAMPLERS:
            raise OptionError(f"sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
        if labels and vector_labels:
            raise OptionError("give either labels (a raster) or vector_labels, not both")
        if not labels and not vector_labels:
            raise OptionError("no labels given; pass a label raster or vector_labels with label_field")
        self.image_path = str(image)
        self.labels_path = str(labels) if labels else None
        self.vector_path = str(vector_labels) if vector_labels else None
        self.label_field = label_field
        self.unlabeled_paths = [str(p) for p in (unlabeled or ())]
        self.tile = int(tile)
        self.seed = int(seed)
        self.ignore_index = int(ignore_index)
        self.val_side = val_side

        self.facts = describe_image(self.image_path)
        f = self.facts
        self.train_box, self.val_box = split_regions(f.bounds, f.res, val_fraction, val_side)
        for name, box in (("training", self.train_box), ("validation", self.val_box)):
            if box is None:
                continue
            w = round((box[2] - box[0]) / f.res[0])
            h = round((box[3] - box[1]) / f.res[1])
            if w < tile or h < tile:
                raise OptionError(f"the {name} part of {self.image_path} is {w}x{h} px, smaller than tile {tile}; "
                                  f"use a smaller tile or change val_fraction")

        for p in self.unlabeled_paths:
            u = describe_image(p)
            if u.count != f.count:
                raise SceneError(f"unlabeled scene {p}: has {u.count} bands but the image has {f.count}; "
                                 f"give scenes of the same sensor and band order")

        name_to_id: dict[str, int] = {}
        if self.labels_path:
            check_same_grid(f, self.labels_path)
            train_counts, _ = label_counts(self.labels_path, self.train_box)
            val_counts, _ = label_counts(self.labels_path, self.val_box) if self.val_box else ({}, None)
            present = dict(train_counts)
            for k, v in val_counts.items():
                present[k] = present.get(k, 0) + v
            self.classes = resolve_classes(classes, present, where=self.labels_path, colors_from=self.labels_path)
        else:
            assert self.vector_path is not None
            gdf = vector_label_values(self.vector_path, label_field, f.crs)
            values, vbounds = list(gdf[label_field]), tuple(float(v) for v in gdf.total_bounds)
            l, b, r, t = f.bounds
            if vbounds[2] <= l or vbounds[0] >= r or vbounds[3] <= b or vbounds[1] >= t:
                raise LabelsError(f"vector labels {self.vector_path}: do not overlap the image; give the labels of this scene")
            if all(isinstance(v, str) for v in values):
                spec = parse_classes(classes) if classes is not None else {
                    i + 1: n for i, n in enumerate(sorted(set(values)))}
                name_to_id = {n: i for i, n in spec.items()}
                unknown = sorted(set(values) - set(name_to_id))
                if unknown:
                    raise LabelsError(f"vector labels {self.vector_path}: classes {', '.join(map(repr, unknown[:8]))} "
                                      f"of {label_field!r} are not named in --classes; add them")
                counts = {name_to_id[v]: values.count(v) for v in set(values)}
                classes = spec
            else:
                try:
                    ints = [int(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
                except (TypeError, ValueError):
                    raise LabelsError(f"vector labels {self.vector_path}: {label_field!r} holds values that are neither "
                                      f"class ids nor names; choose the class attribute") from None
                counts = {v: ints.count(v) for v in set(ints)}
            self.classes = resolve_classes(classes, counts, where=self.vector_path)
            self._label_shapes = list(gdf.geometry)
            # Pixel counts per class from polygon areas inside each part (for class weights).
            train_counts = self._vector_pixel_counts(gdf, label_field or "", name_to_id, self.train_box)
            val_counts = self._vector_pixel_counts(gdf, label_field or "", name_to_id, self.val_box)
        self.name_to_id = name_to_id
        self.lookup = self.classes.lookup()
        self.train_class_counts = {cid: int(train_counts.get(cid, 0)) for cid in self.classes.ids}
        n_train = sum(self.train_class_counts.values())
        n_val = sum(c for v, c in val_counts.items() if v in self.lookup)
        if n_train == 0:
            raise LabelsError(f"labels {self.labels_path or self.vector_path}: no labelled pixels in the training part "
                              f"of the scene; check the labels, --classes, or val_fraction/val_side")
        self.n_labelled = {"train": n_train, "val": n_val}
        self.sampler = sampler

        if samples_per_epoch is None:
            tb = self.train_box
            chips = max(1, round((tb[2] - tb[0]) / f.res[0] / tile) * round((tb[3] - tb[1]) / f.res[1] / tile))
            samples_per_epoch = 4 * chips
        self.length = int(math.ceil(samples_per_epoch / batch_size) * batch_size)

    @property
    def labelled_share(self) -> float:
        """Share of the training part's pixels that carry a label (sparse labels: a few %)."""
        tb, res = self.train_box, self.facts.res
        return min(1.0, self.n_labelled["train"] / max(1.0, (tb[2] - tb[0]) * (tb[3] - tb[1]) / (res[0] * res[1])))

    def _vector_pixel_counts(self, gdf: Any, label_field: str, name_to_id: Mapping[str, int],
                             box: tuple[float, float, float, float] | None) -> dict[int, int]:
        if box is None:
            return {}
        part = gdf.clip(shapely.box(*box))
        if part.empty:
            return {}
        ids = part[label_field].map(lambda v: name_to_id.get(v, 0) if isinstance(v, str) else v)
        px = part.geometry.area / (self.facts.res[0] * self.facts.res[1])
        out: dict[int, int] = {}
        for cid, n in zip(ids, px, strict=True):
            if cid is None or (isinstance(cid, float) and math.isnan(cid)):
                continue
            out[int(cid)] = out.get(int(cid), 0) + int(round(float(n)))
        return out

    # -- datasets ---------------------------------------------------------------------
    def _image_ds(self, paths: str | list[str], transforms: Any = None) -> SceneImage:
        crs = self.facts.crs
        try:
            return SceneImage(paths=paths, crs=crs, res=self.facts.res, transforms=transforms)
        except Exception as e:  # DatasetNotFoundError and rasterio errors
            raise SceneError(f"image {paths}: TorchGeo cannot index it ({str(e).splitlines()[0]})") from None

    def _labelled_ds(self, box: tuple[float, float, float, float] | None) -> GeoDataset:
        img = self._image_ds(self.image_path)
        remap = RemapMask(self.lookup, self.ignore_index)
        outside = IgnoreOutside(box, self.ignore_index) if box is not None else None
        if self.labels_path:
            lab: GeoDataset = SceneLabels(paths=self.labels_path, crs=img.crs, res=self.facts.res)
        else:
            lab = VectorLabels(self.vector_path, crs=img.crs, res=self.facts.res,  # type: ignore[arg-type]
                               label_field=self.label_field or "", name_to_id=self.name_to_id)
        return IntersectionDataset(img, lab, transforms=Compose(remap, outside))

    def setup(self, stage: str) -> None:
        """Build the TorchGeo datasets and samplers for ``stage``."""
        if stage in ("fit",):
            self.train_dataset = self._labelled_ds(self.train_box)
            gen = torch.Generator().manual_seed(self.seed)
            if self.sampler == "labelled":
                f = self.facts
                transform = rasterio.Affine(f.res[0], 0.0, f.bounds[0], 0.0, -f.res[1], f.bounds[3])
                cells = labelled_cells(self.labels_path, self.train_box, transform, max(1, self.tile // 2),
                                       self.classes.ids, shapes=None if self.labels_path else self._label_shapes)
                self.train_sampler: GeoSampler = LabelledPatchSampler(
                    self.train_dataset, self.tile, self.length, self.train_box, cells, generator=gen)
            else:
                self.train_sampler = RandomGeoSampler(self.train_dataset, size=self.tile, length=self.length,
                                                      roi=shapely.box(*self.train_box), generator=gen)
            if self.unlabeled_paths:
                uds = [self._image_ds(p, transforms=AddIgnoreMask(self.ignore_index)) for p in self.unlabeled_paths]
                self.unlabeled_dataset: GeoDataset | None = functools.reduce(operator.or_, uds) if len(uds) > 1 else uds[0]
                ugen = torch.Generator().manual_seed(self.seed + 1)
                self.unlabeled_sampler: RandomGeoSampler | None = RandomGeoSampler(
                    self.unlabeled_dataset, size=self.tile, length=self.length, generator=ugen)
            else:
                self.unlabeled_dataset = None
                self.unlabeled_sampler = None
        if stage in ("fit", "validate") and self.val_box is not None:
            self.val_dataset = self._labelled_ds(self.val_box)
            self.val_sampler = GriddedPatchSampler(self.val_dataset, size=self.tile, stride=self.tile,
                                                   roi=shapely.box(*self.val_box))

    def train_dataloader(self) -> Any:
        """Labelled patches; with unlabelled scenes, a CombinedLoader of both streams."""
        labelled = self._dataloader_factory("train")
        if not self.unlabeled_paths or self.unlabeled_sampler is None:
            return labelled
        unl = DataLoader(self.unlabeled_dataset, batch_size=self.batch_size, sampler=self.unlabeled_sampler,  # type: ignore[arg-type]
                         num_workers=self.num_workers, collate_fn=stack_samples, drop_last=True,
                         persistent_workers=self.num_workers > 0)
        return CombinedLoader({"labeled": labelled, "unlabeled": unl}, mode="max_size_cycle")

    def val_dataloader(self) -> Any:
        """Gridded validation patches, or none when nothing is held out."""
        if self.val_box is None:
            return []
        return self._dataloader_factory("val")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """No batch augmentation: normalisation lives in the task (and in the model file)."""
        return batch

    def describe(self) -> dict[str, Any]:
        """Provenance of the training data, for the model file."""
        return {
            "image": os.path.abspath(self.image_path) if "://" not in self.image_path else self.image_path,
            "labels": self.labels_path or self.vector_path,
            "label_field": self.label_field,
            "unlabeled": self.unlabeled_paths,
            "train_box": list(self.train_box),
            "val_box": list(self.val_box) if self.val_box else None,
            "crs": self.facts.crs.to_string(),
            "labelled_pixels": self.n_labelled,
            "sampler": self.sampler,
        }


def merge_batches(batch: Any) -> dict[str, Tensor]:
    """Flatten a CombinedLoader batch ``{"labeled": b1, "unlabeled": b2}`` into one batch.

    A plain TorchGeo batch (a dict with ``image``) passes through unchanged.

    Args:
        batch: a batch from :class:`SceneDataModule` or any TorchGeo data module.

    Returns:
        One batch with ``image`` and ``mask`` (and whatever else both parts share).
    """
    if isinstance(batch, (list, tuple)) and len(batch) == 3 and isinstance(batch[0], dict):
        batch = batch[0]  # CombinedLoader in some modes yields (batch, batch_idx, dataloader_idx)
    if isinstance(batch, dict) and "image" not in batch and batch:
        parts = [b for b in batch.values() if isinstance(b, dict) and "image" in b]
        keys = set.intersection(*(set(p) for p in parts))
        # Only keys of one shape per sample join: an IntersectionDataset's ``bounds`` hold
        # both datasets' boxes (18 numbers) where an image-only dataset's hold 9.
        return {k: torch.cat([p[k] for p in parts]) for k in keys
                if all(isinstance(p[k], Tensor) and p[k].shape[1:] == parts[0][k].shape[1:] for p in parts)}
    return batch


__all__ = [
    "IGNORE_INDEX", "SceneFacts", "SceneImage", "SceneLabels", "VectorLabels", "RemapMask",
    "IgnoreOutside", "AddIgnoreMask", "SceneDataModule", "resolve_classes", "describe_image",
    "check_same_grid", "label_counts", "label_colors", "split_regions", "merge_batches",
    "vector_label_values",
]

