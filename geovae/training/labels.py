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

from geovae.classes import ClassSpec, parse_classes
from geovae.errors import LabelsError, SceneError
from geovae.scene import Scene, open_raster

__all__ = ["SceneImage", "SceneLabels", "VectorLabels", "check_same_grid", "label_counts", "label_colors",
           "resolve_classes", "vector_label_values"]


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
    fix = (f"resample them onto the image grid, e.g. gdalwarp -t_srs {image.crs.to_string()} "
           f"-tr {res[0]:g} {res[1]:g} -tap -r near LABELS OUT.tif")
    with open_raster(labels_path, "labels") as src:
        if src.count != 1:
            raise LabelsError(f"labels {labels_path}: has {src.count} bands; give a single-band class raster")
        if src.crs is None:
            raise LabelsError(f"labels {labels_path}: has no CRS; {fix}")
        if src.crs != image.crs:
            raise LabelsError(f"labels {labels_path}: CRS {src.crs.to_string()} differs from the image's "
                              f"{image.crs.to_string()}; {fix}")
        rx, ry = abs(src.res[0]), abs(src.res[1])
        if not (math.isclose(rx, res[0], rel_tol=1e-6) and math.isclose(ry, res[1], rel_tol=1e-6)):
            raise LabelsError(f"labels {labels_path}: pixel size {rx:g}x{ry:g} differs from the image's "
                              f"{res[0]:g}x{res[1]:g}; {fix}")
        if src.transform.b != 0 or src.transform.d != 0:
            raise LabelsError(f"labels {labels_path}: has a rotated geotransform; {fix}")
        dx = (src.bounds.left - bounds.left) / res[0]
        dy = (src.bounds.top - bounds.top) / res[1]
        if abs(dx - round(dx)) > 1e-3 or abs(dy - round(dy)) > 1e-3:
            raise LabelsError(f"labels {labels_path}: pixels are offset by a fraction of a pixel from the image's; {fix}")
        l, b, r, t = src.bounds
        if r <= bounds.left or l >= bounds.right or t <= bounds.bottom or b >= bounds.top:
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
        classes: the user's specification (see :func:`~geovae.classes.parse_classes`), or
            None for every non-zero value present in the labels.
        present: ``{label value: pixel count}`` over the labels (nodata already left out).
        where: the labels' name, for messages.
        colors_from: a label raster whose colour table gives the colours.

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
            raise LabelsError(f"labels {where}: class ids {shown} are not named in --classes; "
                              f"add them (e.g. '{unknown[0]}:name') or set them to 0 (unlabelled)")
    if len(named) < 2:
        raise LabelsError(f"labels {where}: only {len(named)} class(es) found; a segmenter needs at least two classes")
    ids = list(named)
    colors = (label_colors(colors_from, ids) if colors_from else None) or []
    return ClassSpec(ids=ids, names=list(named.values()), colors=colors)


# ----------------------------------------------------------------------------- vector labels
def vector_label_values(path: str, field_name: str | None, crs: CRS) -> Any:
    """Read a vector label file, checked, in ``crs``.

    Args:
        path: vector file (GeoPackage, GeoJSON, shapefile, GeoParquet), local or a URL.
        field_name: attribute holding the class (id or name).
        crs: CRS of the image, to compare bounds.

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
            raise SceneError(f"vector labels {path}: no such file; check the path")
        if os.path.isdir(path):
            raise SceneError(f"vector labels {path}: is a folder; give the vector file itself")
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
