"""``geovae evaluate``: a class raster scored against labels and reference objects."""

from __future__ import annotations

import json

import click

from geovae.cli.app import cli


@cli.command()
@click.argument("prediction")
@click.option("--labels", help="Reference label raster on the same grid.")
@click.option("--confidence", help="Confidence raster, for calibration (ECE).")
@click.option("--uncertainty", help="Uncertainty raster, for the error-detection AUROC.")
@click.option("--bins", type=click.IntRange(min=2), default=15, show_default=True, help="Confidence bins for the ECE.")
@click.option(
    "--objects",
    "reference_objects",
    help="Reference object polygons (GPKG, GeoJSON, GeoParquet): object precision, recall and F1 at "
    "IoU >= --object-iou, one to one, and the mean IoU of matched objects.",
)
@click.option(
    "--predicted-objects",
    help="Predicted object polygons [default: <stem>.objects.gpkg next to "
    "PREDICTION]; a class-polygon file scores class regions as objects.",
)
@click.option(
    "--object-iou",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.5,
    show_default=True,
    help="IoU at which two objects match.",
)
@click.option("--object-classes", help="Only predicted polygons of these classes (names or ids, comma-separated).")
@click.option(
    "--object-min-area",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Leave out objects smaller than this (m^2, after clipping to the prediction) on both sides.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def evaluate(
    prediction: str,
    labels: str | None,
    confidence: str | None,
    uncertainty: str | None,
    bins: int,
    reference_objects: str | None,
    predicted_objects: str | None,
    object_iou: float,
    object_classes: str | None,
    object_min_area: float,
    as_json: bool,
) -> None:
    """Score a class raster against labels (IoU per class, mIoU, accuracy, ECE, AUROC) and objects."""
    from geovae.metrics import evaluate as run
    from geovae.metrics import format_report

    if labels is None and reference_objects is None:
        raise click.UsageError("give --labels (a label raster) and/or --objects (reference polygons)")
    d = run(
        prediction,
        labels,
        confidence=confidence,
        uncertainty=uncertainty,
        num_bins=bins,
        objects=reference_objects,
        predicted_objects=predicted_objects,
        object_iou=object_iou,
        object_classes=[c for c in object_classes.split(",") if c.strip()] if object_classes else None,
        object_min_area=object_min_area,
    )
    click.echo(json.dumps(d, indent=2) if as_json else format_report(d))
