"""``geovae vectorize``: a class raster to polygons, or to object polygons (``--objects``)."""

from __future__ import annotations

from collections.abc import Iterable

import click

from geovae.choices import CONNECTIVITIES
from geovae.cli.app import cli, quiet_native
from geovae.errors import OptionError


@cli.command()
@click.argument("classes")
@click.option(
    "-o",
    "--out",
    "outs",
    multiple=True,
    required=True,
    help="Output file; the suffix picks the format (.geojson, .gpkg, .parquet). Repeatable.",
)
@click.option("--confidence", help="Confidence raster for the confidence_mean attribute.")
@click.option("--uncertainty", help="Uncertainty raster for the uncertainty_mean attribute.")
@click.option("--min-area", type=click.FloatRange(min=0), default=0.0, show_default=True, help="m^2.")
@click.option("--simplify", type=click.FloatRange(min=0), default=0.0, show_default=True, help="metres.")
@click.option(
    "--block-size",
    type=click.IntRange(min=16),
    default=1024,
    show_default=True,
    help="Pixels per block; memory grows with it, the polygons do not change.",
)
@click.option(
    "--connectivity",
    type=click.Choice([str(c) for c in CONNECTIVITIES]),
    default="4",
    show_default=True,
    help="Pixel neighbourhood of a region (8 joins diagonal pixels).",
)
@click.option(
    "--objects",
    help="One polygon per object of these classes (names or ids, comma-separated) instead of one per class region.",
)
@click.option(
    "--probabilities",
    help="With --objects: the run's <stem>.object-probability.tif (seeds and the "
    "boundary to split along); without it, objects are split by distance.",
)
@click.option(
    "--object-halo",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="With --objects: pixels around each block the split sees; objects up to this size are exact.",
)
@click.option(
    "--object-seed",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.5,
    show_default=True,
    help="With --objects: interior probability (with a distance band in --probabilities: distance to "
    "the object's outline, 0..1) at which a pixel seeds an object.",
)
def vectorize(
    classes: str,
    outs: tuple[str, ...],
    confidence: str | None,
    uncertainty: str | None,
    min_area: float,
    simplify: float,
    block_size: int,
    connectivity: str,
    objects: str | None,
    probabilities: str | None,
    object_halo: int,
    object_seed: float,
) -> None:
    """Turn a class raster into polygons with class, area and confidence attributes."""
    quiet_native()
    if objects:
        from geovae.vector import vectorize_objects

        if uncertainty or connectivity != "4":
            raise OptionError("--objects takes neither --uncertainty nor --connectivity 8 (objects are 4-connected)")
        ores = vectorize_objects(
            classes,
            list(outs),
            objects=objects,
            probabilities=probabilities,
            confidence=confidence,
            min_area=min_area,
            simplify=simplify,
            block_size=block_size,
            halo=object_halo,
            seed=object_seed,
        )
        _echo_written(f"{ores.n_objects} objects", ores.paths)
        return
    if probabilities:
        raise OptionError("--probabilities applies to --objects; name the object classes with --objects")
    from geovae.vector import vectorize as run

    res = run(
        classes,
        list(outs),
        confidence=confidence,
        uncertainty=uncertainty,
        min_area=min_area,
        simplify=simplify,
        block_size=block_size,
        connectivity=next(c for c in CONNECTIVITIES if str(c) == connectivity),
    )
    _echo_written(f"{res.n_polygons} polygons", res.paths)


def _echo_written(count: str, paths: Iterable[object]) -> None:
    """What a run wrote: its count, then one file a line."""
    click.echo(count)
    for p in paths:
        click.echo(f"  {p}")
