"""``geovae demo``: the built-in default, end to end on the NC Landsat scene."""

from __future__ import annotations

import click

from geovae.cli.app import cli, is_quiet, quiet_lightning, quiet_native
from geovae.cli.segment import print_outputs


@cli.command()
@click.option("-o", "--out", "out_dir", default="geovae-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(), help="Folder that already holds lsat7_2000_{10..70}.tif and strata.tif.")
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Training epochs (about 6 s each on 2 CPU cores).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.pass_context
def demo(ctx: click.Context, out_dir: str, data: str | None, epochs: int, device: str) -> None:
    """Train on a real Landsat-7 scene (west half), segment it, vectorise, score the east half."""
    from geovae.demo import pin_cpu_numerics, run_demo

    # Before Lightning's import loads torch, which reads these settings once.
    pin_cpu_numerics()
    quiet_native()
    quiet_lightning()

    res = run_demo(out_dir, data=data, epochs=epochs, device=device, progress=not is_quiet(ctx))
    click.echo("")
    ev = res.report["evaluation"]
    auroc = ev.get("auroc_uncertainty")
    click.echo(
        f"mIoU on the east half (held out): {ev['miou']:.3f}   ECE: {ev['ece']:.3f}   "
        f"uncertainty AUROC for errors: {'n/a' if auroc is None else format(auroc, '.3f')} "
        f"({ev.get('uncertainty_source') or 'none'})"
    )
    print_outputs(res.outputs)
