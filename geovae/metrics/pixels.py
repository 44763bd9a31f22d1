"""Scores of a confusion matrix, calibration and error detection: training and evaluation share them.

One confusion-matrix convention serves both: :func:`metrics_from_confusion` scores the
confusion matrices the training task accumulates (torchmetrics), and
:func:`~geovae.metrics.evaluate` scores a predicted class raster against labels with the
same IoU / mIoU / accuracy rules (:func:`confusion_scores`), plus the expected calibration
error (:func:`expected_calibration_error`) and the AUROC of the uncertainty for finding
misclassified pixels (:func:`auroc_from_histograms`). Only numpy is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np

__all__ = [
    "AUROC_BINS",
    "ConfusionScores",
    "auroc_from_histograms",
    "confusion_scores",
    "expected_calibration_error",
    "metrics_from_confusion",
]

#: Bins of the uncertainty histogram behind the streamed AUROC; ties inside a bin count half,
#: so the AUROC is exact up to score differences smaller than range / 4096.
AUROC_BINS = 4096


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
