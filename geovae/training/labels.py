"""Labels for training: class rasters and vector labels, checked, counted and read by TorchGeo.

Conventions:
    * Label value 0 and the label raster's nodata value mean "unlabelled" unless ``classes``
      names 0. Unlabelled pixels become ``ignore_index`` in the mask.
    * Labels must lie on the image's pixel grid: geovae does not resample class ids (that
      silently moves class borders by up to a pixel); a mismatch is an error naming the fix.

Every raster here is opened with :func:`geovae.scene.open_raster`, so labels may be local
files or remote (``https://``, ``s3://``, ``/vsi...``) like any scene.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import rasterio
import rasterio.windows
from rasterio.crs import CRS
from torchgeo.datasets import RasterDataset, VectorDataset

from geovae.classes import ClassSpec, parse_classes, rgb
from geovae.errors import LabelsError, SceneError
from geovae.scene import Scene, open_raster

__all__ = [
    "UNLABELLED",
    "ObjectLabels",
    "SceneImage",
    "SceneLabels",
    "VectorLabels",
    "background_area",
    "check_same_grid",
    "label_colors",
    "label_counts",
    "object_label_counts",
    "object_mask",
    "resolve_classes",
    "vector_label_values",
]

#: Mask value of unlabelled pixels in :class:`ObjectLabels` samples (0 is the background class there).
UNLABELLED = -1


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

    def __init__(
        self,
        paths: str | Sequence[str],
        crs: Any,
        res: tuple[float, float],
        label_field: str,
        name_to_id: Mapping[str, int] | None = None,
        transforms: Any = None,
    ) -> None:
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


class ObjectLabels(VectorLabels):
    """Object polygons rasterised by TorchGeo into object interiors, a boundary and background.

    TorchGeo rasterises each polygon with an id of its own (the pixel-centre rule, as for
    :class:`VectorLabels`) on the queried window grown by ``boundary_width`` pixels;
    :func:`object_mask` then gives every pixel its class: the class of its polygon, the
    boundary class within ``boundary_width`` pixels (4-neighbour steps) of a pixel that is not
    of the same polygon (another polygon or none), so two touching polygons of one class
    are kept apart by a boundary on each side of their shared edge; the background class where
    no polygon lies inside ``background``; :data:`UNLABELLED` elsewhere. Growing the window
    first means a patch's edge is never mistaken for an outline.

    Args:
        paths: the vector file (one).
        crs: CRS to rasterise in (the image's).
        res: pixel size (the image's).
        label_field: attribute holding the class id or name.
        name_to_id: class name -> id, for string attributes.
        boundary_width: boundary width in pixels (>= 1).
        boundary_id: class id of the boundary.
        background_id: class id of the background, or None when there is none.
        background: where pixels outside every polygon are background (a shapely geometry
            in ``crs``), or None (they are unlabelled).
        transforms: sample transform.
    """

    def __init__(
        self,
        paths: str,
        crs: Any,
        res: tuple[float, float],
        label_field: str,
        name_to_id: Mapping[str, int] | None = None,
        *,
        boundary_width: int,
        boundary_id: int,
        background_id: int | None,
        background: Any = None,
        transforms: Any = None,
    ) -> None:
        import geopandas as gpd

        self.boundary_width = int(boundary_width)
        self.boundary_id = int(boundary_id)
        self.background_id = background_id
        self.background = background
        super().__init__(paths, crs, res, label_field, name_to_id, transforms)
        # TorchGeo reads the file again for every patch; a feature is named by its row.
        gdf = gpd.read_parquet(paths) if str(paths).lower().endswith(".parquet") else gpd.read_file(paths)
        self.feature_class = np.array(
            [0] + [VectorLabels.get_label(self, row) for _, row in gdf.iterrows()], dtype=np.int64
        )

    def get_label(self, feature: Any) -> int:
        """The feature's id (its row + 1); its class is :attr:`feature_class` of that id."""
        return int(feature.name) + 1

    def __getitem__(self, index: Any) -> dict[str, Any]:
        import shapely
        import torch

        x, y, t = self._disambiguate_slice(index)
        px, py = x.step * self.boundary_width, y.step * self.boundary_width
        grown = (slice(x.start - px, x.stop + px, x.step), slice(y.start - py, y.stop + py, y.step), t)
        transforms, self.transforms = self.transforms, None
        try:
            sample = super().__getitem__(grown)
        finally:
            self.transforms = transforms
        ids = sample["mask"].numpy().astype(np.int64)
        if ids.ndim == 3:
            ids = ids[0]
        bg = None
        if self.background is not None and self.background_id is not None:
            h, w = ids.shape
            xs = x.start - px + (np.arange(w) + 0.5) * x.step
            ys = y.stop + py - (np.arange(h) + 0.5) * y.step
            bg = shapely.contains_xy(self.background, xs[None, :], ys[:, None])
        mask = object_mask(ids, self.feature_class, self.boundary_width, self.boundary_id, bg, self.background_id)
        b = self.boundary_width
        sample["mask"] = torch.from_numpy(mask[b:-b, b:-b].copy())
        sample["bounds"] = self._slice_to_tensor((x, y, t))
        sample["transform"] = torch.tensor(rasterio.transform.from_origin(x.start, y.stop, x.step, y.step))
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample


def object_mask(
    ids: np.ndarray,
    feature_class: np.ndarray,
    boundary_width: int,
    boundary_id: int,
    background: np.ndarray | None,
    background_id: int | None,
) -> np.ndarray:
    """Class per pixel from per-object ids: interiors, a boundary along every outline, background.

    Args:
        ids: (h, w) object id per pixel (0: no object), as rasterised.
        feature_class: class id of each object id (index 0 unused); a class of 0 marks an
            object without a class: its pixels are unlabelled, its outline still a boundary
            for its neighbours.
        boundary_width: pixels (4-neighbour steps) from the outline that are boundary.
        boundary_id: class id of the boundary.
        background: (h, w) bool, where pixels without an object are background; None for none.
        background_id: class id of the background.

    Returns:
        (h, w) int64 class ids, :data:`UNLABELLED` where no label applies. The window's own
        edge is not an outline (pixels beyond it are taken to repeat the edge), so grow the
        window by ``boundary_width`` and crop.
    """
    from scipy import ndimage as ndi

    foot = ndi.iterate_structure(ndi.generate_binary_structure(2, 1), max(1, int(boundary_width)))
    hi = ndi.maximum_filter(ids, footprint=foot, mode="nearest")
    lo = ndi.minimum_filter(ids, footprint=foot, mode="nearest")
    inside = ids > 0
    boundary = inside & ((hi != ids) | (lo != ids))
    cls = feature_class[ids]
    out = np.full(ids.shape, UNLABELLED, dtype=np.int64)
    if background is not None and background_id is not None:
        out[background & ~inside] = background_id
    labelled = inside & (cls > 0)
    out[labelled] = cls[labelled]
    out[boundary] = boundary_id
    return out


def background_area(spec: str | None, labels_path: str, crs: CRS) -> Any:
    """Where pixels outside every label polygon are background.

    Args:
        spec: ``"extent"`` (the bounding box of the labels), ``"none"`` / None (nowhere:
            unlabelled), or a vector file whose polygons mark the area the labels cover.
        labels_path: the label polygons (for ``extent``).
        crs: the image's CRS.

    Returns:
        A shapely geometry in ``crs``, or None.

    Raises:
        LabelsError, SceneError: an unreadable area file.
    """
    import shapely

    if spec is None or spec == "none":
        return None
    if spec == "extent":
        gdf = vector_label_values(labels_path, None, crs, need_field=False)
        return shapely.box(*gdf.total_bounds)
    gdf = vector_label_values(spec, None, crs, need_field=False, what="background area")
    geom = shapely.union_all(gdf.geometry.values)
    if geom.is_empty or geom.area == 0:
        raise LabelsError(f"background area {spec}: holds no polygon area; give polygons of the labelled area")
    return geom


def object_label_counts(
    gdf: Any,
    classes: Sequence[int],
    transform: Any,
    shape: tuple[int, int],
    box: tuple[float, float, float, float] | None,
    boundary_width: int,
    boundary_id: int,
    background_id: int | None,
    background: Any,
    chunk: int = 1024,
) -> dict[int, int]:
    """Pixels per class of :class:`ObjectLabels` inside ``box``, counted chunk by chunk.

    The same rasterisation as the dataset's (pixel-centre rule, one id per polygon, then
    :func:`object_mask`), over windows of ``chunk`` pixels grown by the boundary width, so
    memory stays at one window whatever the scene's size.

    Args:
        gdf: the label polygons (in the image's CRS).
        classes: class id of each row of ``gdf`` (0: no class).
        transform: the image's geotransform.
        shape: the image's (height, width).
        box: (left, bottom, right, top) to count in; None counts nothing.
        boundary_width, boundary_id, background_id, background: as :class:`ObjectLabels`.

    Returns:
        ``{class id: pixels}``.
    """
    import rasterio.features
    import shapely

    if box is None:
        return {}
    win = rasterio.windows.from_bounds(*box, transform=transform).round_offsets().round_lengths()
    r0, c0 = max(0, int(win.row_off)), max(0, int(win.col_off))
    r1, c1 = min(shape[0], int(win.row_off + win.height)), min(shape[1], int(win.col_off + win.width))
    feature_class = np.array([0, *classes], dtype=np.int64)
    geoms = np.asarray(gdf.geometry.values, dtype=object)
    tree = shapely.STRtree(geoms)
    b = int(boundary_width)
    counts: dict[int, int] = {}
    for rr in range(r0, r1, chunk):
        for cc in range(c0, c1, chunk):
            h, w = min(chunk, r1 - rr) + 2 * b, min(chunk, c1 - cc) + 2 * b
            t = transform @ rasterio.Affine.translation(cc - b, rr - b)
            left, top = t @ (0, 0)
            right, bottom = t @ (w, h)
            hits = tree.query(shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom)))
            ids = np.zeros((h, w), np.int64)
            if len(hits):
                ids = rasterio.features.rasterize(
                    ((geoms[i], int(i) + 1) for i in sorted(hits)), out_shape=(h, w), transform=t, dtype="int32"
                ).astype(np.int64)
            bg = None
            if background is not None and background_id is not None:
                xs, _ = t @ (np.arange(w) + 0.5, np.zeros(w))
                _, ys = t @ (np.zeros(h), np.arange(h) + 0.5)
                bg = shapely.contains_xy(background, xs[None, :], ys[:, None])
            m = object_mask(ids, feature_class, b, boundary_id, bg, background_id)[b : h - b, b : w - b]
            vals, n = np.unique(m[m != UNLABELLED], return_counts=True)
            for v, k in zip(vals.tolist(), n.tolist(), strict=True):
                counts[v] = counts.get(v, 0) + k
    return counts


# ----------------------------------------------------------------------------- label rasters
def check_same_grid(image: Scene, labels_path: str) -> None:
    """Check that a label raster lies on the image's pixel grid.

    Args:
        image: the training image, as :func:`geovae.scene.open_scene` describes it.
        labels_path: the label raster.

    Raises:
        LabelsError: if the CRS, pixel size or pixel alignment differ, the labels have
            more than one band, or the two do not overlap.
        SceneError: if the labels are missing or unreadable.
    """
    assert image.crs is not None
    res, bounds = image.res, image.bounds
    fix = (
        f"resample them onto the image grid, e.g. gdalwarp -t_srs {image.crs.to_string()} "
        f"-tr {res[0]:g} {res[1]:g} -tap -r near LABELS OUT.tif"
    )
    with open_raster(labels_path, "labels") as src:
        if src.count != 1:
            raise LabelsError(f"labels {labels_path}: has {src.count} bands; give a single-band class raster")
        if src.crs is None:
            raise LabelsError(f"labels {labels_path}: has no CRS; {fix}")
        if src.crs != image.crs:
            raise LabelsError(
                f"labels {labels_path}: CRS {src.crs.to_string()} differs from the image's "
                f"{image.crs.to_string()}; {fix}"
            )
        rx, ry = abs(src.res[0]), abs(src.res[1])
        if not (math.isclose(rx, res[0], rel_tol=1e-6) and math.isclose(ry, res[1], rel_tol=1e-6)):
            raise LabelsError(
                f"labels {labels_path}: pixel size {rx:g}x{ry:g} differs from the image's {res[0]:g}x{res[1]:g}; {fix}"
            )
        if src.transform.b != 0 or src.transform.d != 0:
            raise LabelsError(f"labels {labels_path}: has a rotated geotransform; {fix}")
        dx = (src.bounds.left - bounds.left) / res[0]
        dy = (src.bounds.top - bounds.top) / res[1]
        if abs(dx - round(dx)) > 1e-3 or abs(dy - round(dy)) > 1e-3:
            raise LabelsError(
                f"labels {labels_path}: pixels are offset by a fraction of a pixel from the image's; {fix}"
            )
        l, b, r, t = src.bounds
        if r <= bounds.left or l >= bounds.right or t <= bounds.bottom or b >= bounds.top:
            raise LabelsError(f"labels {labels_path}: do not overlap the image; give the labels of this scene")


def label_counts(
    path: str, bounds: tuple[float, float, float, float] | None = None
) -> tuple[dict[int, int], float | None]:
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
    with open_raster(path, "labels") as src:
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


def label_colors(path: str, ids: Sequence[int]) -> list[tuple[int, int, int]] | None:
    """Colours of ``ids`` from a label raster's colour table, or None if it has none."""
    with open_raster(path, "labels") as src:
        try:
            cmap = src.colormap(1)
        except ValueError:
            return None
    if not all(i in cmap for i in ids):
        return None
    return [rgb(cmap[i]) for i in ids]


def resolve_classes(
    classes: str | Mapping[Any, Any] | None,
    present: Mapping[int, int],
    *,
    where: str,
    colors_from: str | None = None,
    min_classes: int = 2,
) -> ClassSpec:
    """Decide the model's classes from the user's specification and the labels' values.

    Value 0 is "unlabelled" unless ``classes`` names it.

    Args:
        classes: the user's specification (see :func:`~geovae.classes.parse_classes`), or
            None for every non-zero value present in the labels.
        present: ``{label value: pixel count}`` over the labels (nodata already left out).
        where: the labels' name, for messages.
        colors_from: a label raster whose colour table gives the colours.
        min_classes: fewest classes allowed (object labels add background and boundary
            classes of their own, so one is enough there).

    Returns:
        The :class:`~geovae.classes.ClassSpec`.

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
            raise LabelsError(
                f"labels {where}: class ids {shown} are not named in --classes; "
                f"add them (e.g. '{unknown[0]}:name') or set them to 0 (unlabelled)"
            )
    if len(named) < min_classes:
        raise LabelsError(f"labels {where}: only {len(named)} class(es) found; a segmenter needs at least two classes")
    ids = list(named)
    colors = (label_colors(colors_from, ids) if colors_from else None) or []
    return ClassSpec(ids=ids, names=list(named.values()), colors=colors)


# ----------------------------------------------------------------------------- vector labels
def vector_label_values(
    path: str, field_name: str | None, crs: CRS, *, need_field: bool = True, what: str = "vector labels"
) -> Any:
    """Read a vector label file, checked, in ``crs``.

    Args:
        path: vector file (GeoPackage, GeoJSON, shapefile, GeoParquet), local or a URL.
        field_name: attribute holding the class (id or name).
        crs: CRS of the image, to compare bounds.
        need_field: whether ``field_name`` is required (not for an area file).
        what: the file's role, for messages.

    Returns:
        The GeoDataFrame, reprojected to ``crs``.

    Raises:
        SceneError: if the file is missing or a folder.
        LabelsError: if the file cannot be read, the field is missing or there are no features.
    """
    import os

    import geopandas as gpd

    if "://" not in path and not path.startswith("/vsi"):  # remote files are checked when read
        if not os.path.exists(path):
            raise SceneError(f"{what} {path}: no such file; check the path")
        if os.path.isdir(path):
            raise SceneError(f"{what} {path}: is a folder; give the vector file itself")
    try:
        gdf = gpd.read_parquet(path) if path.lower().endswith(".parquet") else gpd.read_file(path)
    except Exception as e:  # pyogrio raises several types for unreadable files
        raise LabelsError(
            f"{what} {path}: cannot be read ({str(e).splitlines()[0]}); give a GPKG, GeoJSON or shapefile"
        ) from None
    if len(gdf) == 0:
        raise LabelsError(f"{what} {path}: has no features; give labelled polygons")
    if need_field and not field_name:
        raise LabelsError(
            f"{what} {path}: no --label-field given; name the attribute holding the class "
            f"(one of: {', '.join(c for c in gdf.columns if c != 'geometry')})"
        )
    if need_field and field_name not in gdf.columns:
        raise LabelsError(
            f"{what} {path}: has no attribute {field_name!r}; use one of: "
            f"{', '.join(c for c in gdf.columns if c != 'geometry')}"
        )
    if gdf.crs is None:
        raise LabelsError(f"{what} {path}: has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:XXXX)")
    return gdf.to_crs(crs)
