"""Metrics shared by training and evaluation: IoU, accuracy, calibration, error detection, objects.

* :mod:`~geovae.metrics.pixels`: the scores of a confusion matrix (:func:`confusion_scores`,
  :func:`metrics_from_confusion`: the one IoU / mIoU / accuracy rule of training and
  evaluation), the expected calibration error and the AUROC of a score from histograms;
* :mod:`~geovae.metrics.objects`: object precision, recall and F1 at an IoU threshold, one to
  one (:func:`object_scores`: the reference in an STRtree, predicted polygons in batches);
* :mod:`~geovae.metrics.evaluation`: :func:`evaluate`, a class raster streamed block by block
  against labels (and its objects against reference polygons), and :func:`format_report`.
"""

from geovae.metrics.evaluation import evaluate, format_report
from geovae.metrics.objects import OBJECT_IOU, match_objects, object_scores
from geovae.metrics.pixels import (
    AUROC_BINS,
    ConfusionScores,
    auroc_from_histograms,
    confusion_scores,
    expected_calibration_error,
    metrics_from_confusion,
)

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
