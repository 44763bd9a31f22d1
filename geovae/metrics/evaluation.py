"""``evaluate``: a class raster scored against labels, streamed in strips of rows, and its
objects against reference polygons; :func:`format_report`, the table the CLI prints.

The rasters are read in strips of rows, and only a confusion table, a confidence histogram
(for the ECE) and an uncertainty histogram split by right/wrong pixels (for the AUROC) are
kept, so memory does not grow with the scene. A pixel counts only where every raster given
is valid (its nodata tag or mask, and a finite value for the float rasters). Only numpy and
rasterio are imported here, so ``geovae evaluate`` does not pay for torch.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from geovae import signals
from geovae.errors import LabelsError, OptionError
from geovae.metrics.objects import OBJECT_IOU, check_object_file, object_scores
from geovae.metrics.pixels import AUROC_BINS, auroc_from_histograms, confusion_scores, expected_calibration_error
from geovae.products import POLYGON_FORMATS, read_class_table
from geovae.scene import grid_mismatch, open_raster

__all__ = ["evaluate", "format_report"]

# Pixels per strip: a few MB per raster, whatever the scene's size.
_STRIP_PIXELS = 1 << 21


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
    check_object_file(reference, "reference objects")
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
    names = {k: v["name"] for k, v in read_class_table(pred).items()}
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
