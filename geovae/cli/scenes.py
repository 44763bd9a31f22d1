"""``geovae info`` (a raster described) and ``geovae view`` (an output folder in the browser)."""

from __future__ import annotations

import json
from typing import Any

import click

from geovae.cli.app import cli


@cli.command()
@click.argument("scene")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(scene: str, as_json: bool) -> None:
    """Describe a raster: size, bands, CRS, transform, bounds, nodata, blocks, overviews."""
    from geovae.scene import describe_scene

    d = describe_scene(scene)
    click.echo(json.dumps(d, indent=2, default=str) if as_json else _format_info(d))


def _format_info(d: dict[str, Any]) -> str:
    """Key: value lines, in the order describe_scene gives them; long lists stay on one line.

    The WKT is left to ``--json``: one 600-character line helps nobody reading a terminal.
    """
    d = {k: v for k, v in d.items() if k != "crs_wkt"}
    width = max(len(k) for k in d) if d else 0
    lines = []
    for k, v in d.items():
        if isinstance(v, float):
            v = f"{v:.12g}"  # coordinates need all their digits; %g would round 2826915 to 2.82692e+06
        elif isinstance(v, (list, tuple)):
            items = [f"{x:.12g}" if isinstance(x, float) else str(x) for x in v]
            v = ", ".join(items) if len(items) <= 12 else ", ".join(items[:12]) + f", ... ({len(items)} in all)"
        elif v is None:
            v = "-"
        lines.append(f"{k.replace('_', ' '):>{width}}: {v}")
    return "\n".join(lines)


@cli.command()
@click.argument("path", type=click.Path())
@click.option(
    "--host",
    help="Address to listen on [default: 127.0.0.1, this machine only]. Another "
    "(0.0.0.0...) shows the outputs to anyone who can reach it.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port; 0 picks a free one.")
@click.option("--no-browser", is_flag=True, help="Only print the address; do not open a browser.")
@click.option(
    "--basemap",
    help="XYZ tile URL template drawn under the layers, e.g. "
    "https://tile.openstreetmap.org/{z}/{x}/{y}.png [default: none; the page loads "
    "nothing from outside this machine].",
)
def view(path: str, host: str | None, port: int, no_browser: bool, basemap: str | None) -> None:
    """Look at a segment or batch output folder (or one report .json) in the browser.

    Serves the folder read-only on a local address until Ctrl-C: the scene, classes with
    their legend and areas, confidence, uncertainty and reconstruction error, and the
    polygons (click one for its attributes).
    """
    from geovae.view import serve

    serve(path, host=host, port=port, basemap=basemap, open_browser=not no_browser, echo=click.echo)
