"""Object scores: precision, recall and F1 of predicted objects against reference polygons,
matched one to one at an IoU threshold."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from geovae.errors import LabelsError, OptionError

__all__ = ["OBJECT_IOU", "check_object_file", "match_objects", "object_scores"]

#: Objects match when their IoU is at least this (one to one), the common convention of
#: instance and field-delineation benchmarks (COCO's AP50, Fields of the World's object F1).
OBJECT_IOU = 0.5
#: Predicted polygons read per batch when scoring objects.
_OBJECT_BATCH = 20_000


def match_objects(pairs: Sequence[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    """One-to-one matches from candidate ``(iou, reference, predicted)`` pairs: greedily by
    descending IoU (ties by the indices), each object used at most once.

    Above an IoU of 0.5 an object can overlap more than half of at most one object of a set
    whose objects do not overlap, so there the greedy matching is the only one; it also
    stays one to one for sets that do overlap.
    """
    used_r: set[int] = set()
    used_p: set[int] = set()
    out = []
    for iou, r, p in sorted(pairs, key=lambda t: (-t[0], t[1], t[2])):
        if r in used_r or p in used_p:
            continue
        used_r.add(r)
        used_p.add(p)
        out.append((iou, r, p))
    return out


def check_object_file(source: Any, what: str) -> None:
    """Refuse a local polygon file that does not exist (a GeoDataFrame or a URL passes).

    Raises:
        LabelsError: naming it as ``what``.
    """
    if isinstance(source, (str, os.PathLike)) and "://" not in str(source) and not os.path.exists(source):
        raise LabelsError(f"{what} {source}: no such file; check the path")


def _read_objects(source: Any, what: str, batch: int | None = None) -> Iterator[Any]:
    """A polygon file (any format geovae writes or GDAL reads) as GeoDataFrames, in batches."""
    import geopandas as gpd
    import pyogrio

    if isinstance(source, gpd.GeoDataFrame):
        yield source
        return
    check_object_file(source, what)
    path = str(source)
    try:
        if path.lower().endswith(".parquet"):
            yield gpd.read_parquet(path)
            return
        layers = [name for name, _ in pyogrio.list_layers(path)]
        layer = next((n for n in layers if n != "layer_styles"), None)
        n = pyogrio.read_info(path, layer=layer)["features"]
        step = batch or max(n, 1)
        for start in range(0, max(n, 1), step):
            yield pyogrio.read_dataframe(path, layer=layer, skip_features=start, max_features=step)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as e:
        raise LabelsError(
            f"{what} {path}: cannot be read ({str(e).splitlines()[0]}); give a GPKG, GeoJSON or "
            "GeoParquet file of polygons"
        ) from None


def _class_filter(gdf: Any, classes: Sequence[str | int] | None) -> Any:
    if not classes:
        return gdf
    keep = np.zeros(len(gdf), bool)
    for c in classes:
        key = str(c).strip()
        if "class_name" in gdf.columns:
            keep |= gdf["class_name"].astype(str).str.strip().str.lower().to_numpy() == key.lower()
        if "class_id" in gdf.columns and key.lstrip("-").isdigit():
            keep |= gdf["class_id"].to_numpy() == int(key)
    return gdf[keep]


def object_scores(
    predicted: Any,
    reference: Any,
    *,
    iou_threshold: float = OBJECT_IOU,
    region: Any = None,
    classes: Sequence[str | int] | None = None,
    min_area: float = 0.0,
    region_crs: Any = None,
) -> dict[str, Any]:
    """Object precision, recall and F1 at an IoU threshold, with one-to-one matching.

    Every reference object is matched to at most one predicted object and the reverse; a
    pair matches when the IoU of their areas is at least ``iou_threshold``
    (:func:`match_objects`). The reference is loaded whole (an STRtree over it); predicted
    polygons are read in batches of 20,000, so a scene's objects are never all in memory.

    Args:
        predicted: predicted polygons: ``<stem>.objects.gpkg`` (or ``.parquet``,
            ``.geojson``), class-region polygons (``<stem>.gpkg``, then pass ``classes``),
            or a GeoDataFrame.
        reference: reference polygons (a file or a GeoDataFrame), e.g. a parcel register.
        iou_threshold: IoU at which two objects match (0.5).
        region: a shapely geometry, or ``(left, bottom, right, top)``, in ``region_crs``:
            both sets are clipped to it first, so a reference that extends past
            the predicted area is not counted against it (objects cut by its edge are
            compared cut). None: the predicted polygons' extent is not used; every reference
            object counts.
        classes: keep only predicted polygons of these classes (names or ids; ``class_name``
            / ``class_id`` columns); None keeps all.
        min_area: leave out objects (of both sets, after clipping) smaller than this, in
            square metres (the units of a projected CRS).
        region_crs: the CRS of ``region`` (default: the reference's).

    Returns:
        ``{"iou_threshold", "reference", "predicted", "matched", "precision", "recall",
        "f1", "mean_iou"}`` (``mean_iou`` over matched pairs; None where undefined) and
        ``crs`` (the CRS areas were measured in).

    Raises:
        LabelsError: an unreadable file, or polygons without a CRS.
        OptionError: an IoU threshold outside (0, 1].
    """
    import shapely

    if not 0.0 < float(iou_threshold) <= 1.0:
        raise OptionError(f"object IoU threshold {iou_threshold}: must be in (0, 1]")
    ref = next(iter(_read_objects(reference, "reference objects")))
    ref_crs = ref.crs
    box = None
    if region is not None:
        box = shapely.box(*region) if isinstance(region, (tuple, list)) else region
    crs = None
    # the reference in the CRS areas are measured in: its search tree, geometries and areas
    measured: tuple[Any, np.ndarray, np.ndarray] | None = None
    n_pred = 0
    pairs: list[tuple[float, int, int]] = []

    def prepare(gdf: Any) -> np.ndarray:
        g = np.asarray(gdf.geometry.values, dtype=object)
        g = g[~shapely.is_empty(g) & ~shapely.is_missing(g)]
        bad = ~shapely.is_valid(g)
        if bad.any():  # e.g. a self-touching ring in a register: repaired, not dropped
            g = g.copy()
            g[bad] = shapely.make_valid(g[bad])
        if box is not None:
            g = shapely.intersection(g, box)
            g = g[~shapely.is_empty(g)]
        return g[shapely.area(g) >= min_area] if min_area > 0 else g[shapely.area(g) > 0]

    for batch in _read_objects(predicted, "predicted objects", _OBJECT_BATCH):
        if measured is None:
            crs = batch.crs
            if crs is None or ref_crs is None:
                raise LabelsError("predicted or reference objects have no CRS; set one (e.g. ogr2ogr -a_srs EPSG:XXXX)")
            if crs.is_geographic:
                # Areas in degrees are not areas: measure both in the local UTM zone.
                crs = batch.estimate_utm_crs() if len(batch) else ref.estimate_utm_crs()
            if box is not None:
                import geopandas as gpd

                box = gpd.GeoSeries([box], crs=region_crs or ref_crs).to_crs(crs).iloc[0]
            ref_geoms = prepare(ref.to_crs(crs))
            measured = (shapely.STRtree(ref_geoms), ref_geoms, shapely.area(ref_geoms))
        tree, ref_geoms, ref_area = measured
        batch = _class_filter(batch, classes)
        g = prepare(batch.to_crs(crs))
        if len(g) == 0:
            continue
        pi, ri = tree.query(g, predicate="intersects")
        if len(pi):
            inter = shapely.area(shapely.intersection(g[pi], ref_geoms[ri]))
            iou = inter / (shapely.area(g[pi]) + ref_area[ri] - inter)
            ok = iou >= iou_threshold - 1e-12
            pairs += list(zip(iou[ok].tolist(), ri[ok].tolist(), (pi[ok] + n_pred).tolist()))
        n_pred += len(g)
    # without a predicted batch the reference was never measured
    ref_geoms = prepare(ref) if measured is None else measured[1]
    matched = match_objects(pairs)
    m, n_ref = len(matched), len(ref_geoms)
    precision = m / n_pred if n_pred else None
    recall = m / n_ref if n_ref else None
    f1 = 2 * m / (n_pred + n_ref) if n_pred + n_ref else None
    return {
        "iou_threshold": float(iou_threshold),
        "reference": n_ref,
        "predicted": n_pred,
        "matched": m,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_iou": float(np.mean([t[0] for t in matched])) if matched else None,
        "crs": None if crs is None else crs.to_string(),
    }
