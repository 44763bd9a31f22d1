"""Metrics shared by training and evaluation: IoU, accuracy, calibration, error detection.

One confusion-matrix convention serves both: :func:`metrics_from_confusion` scores the
confusion matrices the training task accumulates (torchmetrics), and :func:`evaluate`
scores a predicted class raster against labels with the same IoU / mIoU / accuracy rules
(:func:`confusion_scores`), plus the expected calibration error
(:func:`expected_calibration_error`) and the AUROC of the uncertainty for finding
misclassified pixels (:func:`auroc_from_histograms`).

:func:`evaluate` streams: the rasters are read in strips of rows, and only a confusion table,
a confidence histogram (for the ECE) and an uncertainty histogram split by right/wrong
pixels (for the AUROC) are kept, so memory does not grow with the scene. A pixel counts
only where every raster given is valid (its nodata tag or mask, and a finite value for the
float rasters). Only numpy and rasterio are imported here, so ``geovae evaluate`` does not
pay for torch.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, TypedDict

import numpy as np
import rasterio
from rasterio.windows import Window

from geovae import signals
from geovae.errors import LabelsError, OptionError
from geovae.scene import grid_mismatch, open_raster

__all__ = [
    "AUROC_BINS",
    "OBJECT_IOU",
    "ConfusionScores",
    "auroc_from_histograms",
    "confusion_scores",
    "evaluate",
    "expected_calibration_error",
    "format_report",
    "match_objects",
    "metrics_from_confusion",
    "object_scores",
]

#: Objects match when their IoU is at least this (one to one), the common convention of
#: instance and field-delineation benchmarks (COCO's AP50, Fields of the World's object F1).
OBJECT_IOU = 0.5
#: Predicted polygons read per batch when scoring objects.
_OBJECT_BATCH = 20_000

#: Bins of the uncertainty histogram behind the streamed AUROC; ties inside a bin count half,
#: so the AUROC is exact up to score differences smaller than range / 4096.
AUROC_BINS = 4096
# Pixels per strip: a few MB per raster, whatever the scene's size.
_STRIP_PIXELS = 1 << 21


# ----------------------------------------------------------------------------- confusion matrices


class ConfusionScores(TypedDict):
    """What :func:`confusion_scores` returns."""

    iou: np.ndarray
    support: np.ndarray
    predicted: np.ndarray
    present: np.ndarray
    mIoU: float
    OA: float


def confusion_scores(cm: Any) -> ConfusionScores:
    """IoU per class, support, predictions and overall accuracy of a confusion matrix.

    The one IoU rule of geovae: IoU = TP / (TP + FP + FN) per class, NaN where a class is
    neither in the reference nor predicted; mIoU averages the classes present in the
    reference (rows with support), so a class that is only predicted lowers the others'
    IoU through its false positives but is not itself averaged.

    Args:
        cm: (K, K) confusion matrix (numpy array or torch tensor), rows = reference,
            columns = prediction.

    Returns:
        ``iou`` (K,) float64, ``support`` (K,) reference pixels, ``predicted`` (K,),
        ``present`` (K,) bool, ``mIoU`` and ``OA`` (NaN when undefined).
    """
    if hasattr(cm, "detach"):
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    union = support + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    present = support > 0
    total = cm.sum()
    return {
        "iou": iou,
        "support": support,
        "predicted": predicted,
        "present": present,
        "mIoU": float(iou[present].mean()) if present.any() else float("nan"),
        "OA": float(tp.sum() / total) if total > 0 else float("nan"),
    }


def metrics_from_confusion(cm: Any, names: Sequence[str] | None = None) -> dict[str, float]:
    """Per-class IoU, mIoU and overall accuracy from a confusion matrix (see :func:`confusion_scores`).

    Args:
        cm: (K, K) confusion matrix, rows = reference, columns = prediction.
        names: class names for the per-class keys (default ``0..K-1``).

    Returns:
        ``mIoU``, ``OA`` and ``IoU_<name>`` for each class (NaN when it has no support).
    """
    s = confusion_scores(cm)
    iou, present = s["iou"], s["present"]
    out: dict[str, float] = {"mIoU": s["mIoU"], "OA": s["OA"]}
    names = list(names) if names else [str(i) for i in range(len(iou))]
    for i, n in enumerate(names):
        out[f"IoU_{n}"] = float(iou[i]) if bool(present[i]) else float("nan")
    return out


# ----------------------------------------------------------------------------- calibration, error detection
def expected_calibration_error(
    count: np.ndarray, confidence_sum: np.ndarray, correct: np.ndarray
) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error from per-bin counts of equal-width confidence bins.

    Args:
        count: pixels per bin.
        confidence_sum: sum of the confidences in each bin.
        correct: correctly classified pixels per bin.

    Returns:
        ``(ece, reliability)``: the ECE (bin-size-weighted mean of |accuracy - confidence|)
        and per bin ``lower``, ``upper``, ``count``, ``accuracy`` and ``confidence`` (None
        for an empty bin).
    """
    num_bins = len(count)
    n = count.sum()
    nz = count > 0
    acc_b = np.where(nz, correct / np.maximum(count, 1), 0.0)
    conf_b = np.where(nz, confidence_sum / np.maximum(count, 1), 0.0)
    ece = float((count / max(n, 1) * np.abs(acc_b - conf_b)).sum())
    reliability = [
        {
            "lower": i / num_bins,
            "upper": (i + 1) / num_bins,
            "count": int(count[i]),
            "accuracy": float(acc_b[i]) if nz[i] else None,
            "confidence": float(conf_b[i]) if nz[i] else None,
        }
        for i in range(num_bins)
    ]
    return ece, reliability


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUROC of a score for positives over negatives from binned counts (ties count half).

    Args:
        pos: counts of positives (e.g. misclassified pixels) per score bin, ascending score.
        neg: counts of negatives per score bin.

    Returns:
        The AUROC, or None when either class is empty.
    """
    p, n = pos.sum(), neg.sum()
    if p == 0 or n == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (p * n))


# ----------------------------------------------------------------------------- rasters
def _check_grid(ref: rasterio.DatasetReader, other: rasterio.DatasetReader, what: str) -> None:
    problems = grid_mismatch(ref, other)
    if problems:
        raise LabelsError(
            f"{what} {other.name} is not on the prediction's grid ({'; '.join(problems)}); "
            "resample it to the prediction's grid (e.g. gdalwarp -te/-tr/-t_srs) first"
        )


def _strips(height: int, width: int) -> Iterator[Window]:
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for r in range(0, height, rows):
        signals.check()
        yield Window(0, r, width, min(rows, height - r))


def _valid(ds: rasterio.DatasetReader, window: Window, data: np.ndarray) -> np.ndarray:
    ok = ds.read_masks(1, window=window) > 0
    if np.issubdtype(data.dtype, np.floating):
        ok &= np.isfinite(data)
    return ok


def _class_names(pred: rasterio.DatasetReader) -> dict[int, str]:
    tags = pred.tags()
    try:
        return {int(c["id"]): str(c["name"]) for c in json.loads(tags["CLASSES"])}
    except (KeyError, TypeError, ValueError):
        return {int(k[6:]): v for k, v in tags.items() if k.startswith("CLASS_") and k[6:].isdigit()}


def _confidence_scale(ds: rasterio.DatasetReader) -> float:
    # A float raster holds probabilities; an 8-bit one the common 0..255 quantisation.
    dt = np.dtype(ds.dtypes[0])
    if np.issubdtype(dt, np.floating):
        return 1.0
    return 255.0 if dt == np.uint8 else float(np.iinfo(dt).max)


def evaluate(
    prediction: str | os.PathLike[str],
    labels: str | os.PathLike[str] | None = None,
    *,
    confidence: str | os.PathLike[str] | None = None,
    uncertainty: str | os.PathLike[str] | None = None,
    num_bins: int = 15,
    objects: str | os.PathLike[str] | None = None,
    predicted_objects: str | os.PathLike[str] | None = None,
    object_iou: float = OBJECT_IOU,
    object_classes: Sequence[str | int] | None = None,
    object_min_area: float = 0.0,
) -> dict[str, Any]:
    """Compare a predicted class raster with a label raster on the same grid, and objects.

    Args:
        prediction: ``<stem>.classes.tif`` (class ids; its nodata tag, 255 from geovae).
        labels: a class raster of the same ids on the same grid, with its own nodata tag
            (the NC land-class map uses 0); None scores objects only.
        objects: reference object polygons (e.g. a parcel register): adds ``objects``, the
            object precision, recall, F1 and mean IoU of :func:`object_scores`, both sets
            clipped to the prediction's bounds.
        predicted_objects: the predicted object polygons; default the run's
            ``<stem>.objects.gpkg`` (``.parquet``, ``.geojson``) next to ``prediction``. A
            class-polygon file (``<stem>.gpkg``) scores class regions as objects (pass
            ``object_classes``).
        object_iou: IoU at which two objects match.
        object_classes: only predicted polygons of these classes (names or ids) count.
        object_min_area: objects smaller than this (m^2, after clipping) are left out of
            both sets.
        confidence: ``<stem>.confidence.tif`` (max class probability) for the expected
            calibration error; float in [0, 1], or uint8 scaled 0..255.
        uncertainty: ``<stem>.uncertainty.tif``; band 1 (predictive entropy) is the score
            whose AUROC for finding misclassified pixels is reported. Without it,
            ``1 - confidence`` is used when ``confidence`` is given.
        num_bins: equal-width confidence bins of the ECE.

    Returns:
        A JSON-serialisable dict: ``pixels`` (evaluated), ``overall_accuracy``, ``miou``
        (mean IoU over the classes present in the labels), ``per_class_iou`` {id: IoU},
        ``classes`` (per class: id, name, iou, label_pixels, predicted_pixels,
        present_in_labels), ``class_ids`` and ``confusion_matrix`` (rows labels, columns
        predictions), ``ece`` and ``reliability`` (per-bin count, accuracy, confidence) when
        a confidence raster is given, ``auroc_uncertainty`` and ``uncertainty_source``
        (None where nothing can be computed), ``num_bins``.
        With ``objects``: ``objects``, :func:`object_scores`' result with
        ``predicted_objects`` and ``reference_objects`` (the files); without ``labels``
        only that.

    Raises:
        SceneError: a raster is missing or unreadable.
        LabelsError: a raster is on another grid, a class raster is not integer, or no
            pixel is valid in all of them; an object file is unreadable or has no CRS.
        OptionError: neither labels nor objects, or no predicted objects found.
    """
    if num_bins < 1:
        raise LabelsError(f"num_bins={num_bins}: use at least one calibration bin")
    if labels is None and objects is None:
        raise OptionError(
            "nothing to score against: give --labels (a label raster) and/or --objects (reference polygons)"
        )
    result: dict[str, Any] = {}
    if objects is not None:
        result["objects"] = _evaluate_objects(
            prediction, objects, predicted_objects, object_iou, object_classes, object_min_area
        )
    if labels is None:
        return result
    return {**_evaluate_pixels(prediction, labels, confidence, uncertainty, num_bins), **result}


def _evaluate_objects(
    prediction: Any, reference: Any, predicted: Any, iou: float, classes: Any, min_area: float
) -> dict[str, Any]:
    from pathlib import Path

    from geovae.products import POLYGON_FORMATS, read_class_table

    with open_raster(prediction, "prediction") as pred:
        bounds, crs = tuple(pred.bounds), pred.crs
        table = read_class_table(pred)
    if classes and table:
        # A class the prediction does not have would filter every polygon out and score F1 0.
        by_name = {str(v["name"]).strip().lower() for v in table.values()}
        for c in classes:
            key = str(c).strip()
            if key.lower() not in by_name and not (key.lstrip("-").isdigit() and int(key) in table):
                listed = ", ".join(f"{k}:{v['name']}" for k, v in sorted(table.items()))
                raise OptionError(
                    f"--object-classes {key}: no such class in {prediction} (its classes are {listed}); "
                    "name classes of the prediction"
                )
    if isinstance(reference, (str, os.PathLike)) and "://" not in str(reference) and not os.path.exists(reference):
        raise LabelsError(f"reference objects {reference}: no such file; check the path")
    if predicted is None:
        name = Path(str(prediction)).name
        stem = name[: -len(".classes.tif")] if name.endswith(".classes.tif") else Path(name).stem
        found = [Path(str(prediction)).with_name(f"{stem}.objects{sfx}") for sfx, _ in POLYGON_FORMATS.values()]
        found = [p for p in found if p.exists()]
        if not found:
            raise OptionError(
                f"no object polygons next to {prediction} ({stem}.objects.gpkg/.parquet/.geojson); "
                "segment with --objects, or pass --predicted-objects"
            )
        predicted = next((p for p in found if p.suffix == ".gpkg"), found[0])
    scores = object_scores(
        predicted, reference, iou_threshold=iou, region=bounds, region_crs=crs, classes=classes, min_area=min_area
    )
    return {"predicted_objects": str(predicted), "reference_objects": str(reference), **scores}


def _evaluate_pixels(prediction: Any, labels: Any, confidence: Any, uncertainty: Any, num_bins: int) -> dict[str, Any]:
    pred = open_raster(prediction, "prediction")
    opened = [pred]
    try:
        lab = open_raster(labels, "labels")
        opened.append(lab)
        _check_grid(pred, lab, "labels")
        for ds, what in ((pred, "prediction"), (lab, "labels")):
            if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
                raise LabelsError(f"{what} {ds.name} has {ds.dtypes[0]} values; give an integer class raster")
        conf = unc = None
        if confidence is not None:
            conf = open_raster(confidence, "confidence")
            opened.append(conf)
            _check_grid(pred, conf, "confidence raster")
        if uncertainty is not None:
            unc = open_raster(uncertainty, "uncertainty")
            opened.append(unc)
            _check_grid(pred, unc, "uncertainty raster")
        return _accumulate(pred, lab, conf, unc, num_bins)
    finally:
        for ds in opened:
            ds.close()


def _score_range(unc: rasterio.DatasetReader) -> tuple[float, float]:
    tag = unc.tags().get("MAX_ENTROPY")
    if tag is not None:
        try:
            return 0.0, float(tag)
        except ValueError:
            pass
    lo, hi = math.inf, -math.inf
    for w in _strips(unc.height, unc.width):
        u = unc.read(1, window=w)
        ok = _valid(unc, w, u)
        if ok.any():
            lo, hi = min(lo, float(u[ok].min())), max(hi, float(u[ok].max()))
    return (0.0, 1.0) if lo > hi else (lo, hi)


def _accumulate(
    pred: rasterio.DatasetReader,
    lab: rasterio.DatasetReader,
    conf: rasterio.DatasetReader | None,
    unc: rasterio.DatasetReader | None,
    num_bins: int,
) -> dict[str, Any]:
    pairs: Counter[tuple[int, int]] = Counter()
    ece_n = np.zeros(num_bins, np.int64)
    ece_conf = np.zeros(num_bins, np.float64)
    ece_acc = np.zeros(num_bins, np.int64)
    hist_err = np.zeros(AUROC_BINS, np.int64)
    hist_ok = np.zeros(AUROC_BINS, np.int64)
    if unc is not None:
        lo, hi = _score_range(unc)
        source = "entropy (uncertainty band 1)"
    elif conf is not None:
        lo, hi = 0.0, 1.0
        source = "1 - confidence"
    else:
        lo, hi, source = 0.0, 1.0, None
    span = hi - lo if hi > lo else 1.0
    cscale = _confidence_scale(conf) if conf is not None else 1.0

    for w in _strips(pred.height, pred.width):
        p = pred.read(1, window=w)
        y = lab.read(1, window=w)
        ok = _valid(pred, w, p) & _valid(lab, w, y)
        c = u = None
        if conf is not None:
            c = conf.read(1, window=w).astype(np.float64) / cscale
            ok &= _valid(conf, w, c)
        if unc is not None:
            u = unc.read(1, window=w).astype(np.float64)
            ok &= _valid(unc, w, u)
        if not ok.any():
            continue
        pv, yv = p[ok].astype(np.int64), y[ok].astype(np.int64)
        # One int64 key per (label, prediction) pair; ids of any integer dtype fit in 32 bits.
        keys, counts = np.unique((yv << 32) + (pv & 0xFFFFFFFF), return_counts=True)
        for k, n in zip(keys.tolist(), counts.tolist()):
            pairs[(k >> 32, (k & 0xFFFFFFFF) - ((k & 0x80000000) << 1))] += n
        correct = pv == yv
        if c is not None:
            cv = np.clip(c[ok], 0.0, 1.0)
            b = np.minimum((cv * num_bins).astype(np.int64), num_bins - 1)
            ece_n += np.bincount(b, minlength=num_bins)
            ece_conf += np.bincount(b, weights=cv, minlength=num_bins)
            ece_acc += np.bincount(b, weights=correct, minlength=num_bins).astype(np.int64)
        score = u[ok] if u is not None else (1.0 - np.clip(c[ok], 0.0, 1.0) if c is not None else None)
        if score is not None:
            sb = np.clip(((score - lo) / span * AUROC_BINS).astype(np.int64), 0, AUROC_BINS - 1)
            hist_err += np.bincount(sb[~correct], minlength=AUROC_BINS)
            hist_ok += np.bincount(sb[correct], minlength=AUROC_BINS)

    total = sum(pairs.values())
    if total == 0:
        raise LabelsError(
            f"no pixel is valid in both {pred.name} and {lab.name}; check the labels' nodata tag and extent"
        )
    ids = sorted({a for a, _ in pairs} | {b for _, b in pairs})
    index = {c: i for i, c in enumerate(ids)}
    cm = np.zeros((len(ids), len(ids)), np.int64)
    for (a, b), n in pairs.items():
        cm[index[a], index[b]] = n
    scores = confusion_scores(cm)
    # Every id here is in the labels or the predictions, so no union is empty.
    iou = np.nan_to_num(scores["iou"], nan=0.0)
    label_px, pred_px, present = scores["support"], scores["predicted"], scores["present"]
    names = _class_names(pred)
    classes = [
        {
            "id": int(c),
            "name": names.get(int(c), f"class {c}"),
            "iou": float(iou[i]),
            "label_pixels": int(label_px[i]),
            "predicted_pixels": int(pred_px[i]),
            "present_in_labels": bool(present[i]),
        }
        for i, c in enumerate(ids)
    ]
    result: dict[str, Any] = {
        "pixels": int(total),
        "overall_accuracy": scores["OA"],
        "miou": scores["mIoU"],
        "per_class_iou": {int(c): float(iou[i]) for i, c in enumerate(ids) if present[i]},
        "classes": classes,
        "class_ids": [int(c) for c in ids],
        "confusion_matrix": cm.tolist(),
        "num_bins": num_bins,
        "ece": None,
        "reliability": None,
        "auroc_uncertainty": None,
        "uncertainty_source": source,
    }
    if conf is not None:
        result["ece"], result["reliability"] = expected_calibration_error(ece_n, ece_conf, ece_acc)
    if source is not None:
        result["auroc_uncertainty"] = auroc_from_histograms(hist_err, hist_ok)
    return result


# ----------------------------------------------------------------------------- objects
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


def _read_objects(source: Any, what: str, batch: int | None = None) -> Iterator[Any]:
    """A polygon file (any format geovae writes or GDAL reads) as GeoDataFrames, in batches."""
    import geopandas as gpd
    import pyogrio

    if isinstance(source, gpd.GeoDataFrame):
        yield source
        return
    path = str(source)
    if "://" not in path and not os.path.exists(path):
        raise LabelsError(f"{what} {path}: no such file; check the path")
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


def format_report(d: dict[str, Any]) -> str:
    """A readable plain-text table of :func:`evaluate`'s result, for the CLI.

    Args:
        d: the dict returned by :func:`evaluate`.

    Returns:
        Multi-line text: one row per class, then the summary metrics.
    """

    def num(v: float | None, fmt: str = "{:.4f}") -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    lines = _format_pixels(d, num) if "classes" in d else []
    o = d.get("objects")
    if o:
        if lines:
            lines.append("")
        lines.append(
            f"objects (IoU >= {o['iou_threshold']:g}, one to one): {o['matched']:,} matched of "
            f"{o['predicted']:,} predicted and {o['reference']:,} reference"
        )
        lines.append(f"object precision   {num(o['precision'])}")
        lines.append(f"object recall      {num(o['recall'])}")
        lines.append(f"object F1          {num(o['f1'])}")
        lines.append(f"mean IoU (matched) {num(o['mean_iou'])}")
    return "\n".join(lines)


def _format_pixels(d: dict[str, Any], num: Any) -> list[str]:
    width = max([len("class")] + [len(c["name"]) for c in d["classes"]])
    lines = [f"{'id':>4}  {'class':<{width}}  {'IoU':>7}  {'label px':>10}  {'predicted px':>12}"]
    lines.append("-" * len(lines[0]))
    for c in d["classes"]:
        mark = "" if c["present_in_labels"] else "  (not in labels; not in mIoU)"
        lines.append(
            f"{c['id']:>4}  {c['name']:<{width}}  {num(c['iou']):>7}  {c['label_pixels']:>10,}  "
            f"{c['predicted_pixels']:>12,}{mark}"
        )
    lines.append("")
    lines.append(f"pixels evaluated   {d['pixels']:,}")
    lines.append(f"mIoU               {num(d['miou'])}")
    lines.append(f"overall accuracy   {num(d['overall_accuracy'])}")
    lines.append(f"ECE ({d['num_bins']} bins)      {num(d['ece'])}")
    src = f" ({d['uncertainty_source']})" if d.get("uncertainty_source") else ""
    lines.append(f"AUROC of errors    {num(d['auroc_uncertainty'])}{src}")
    return lines
