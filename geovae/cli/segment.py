"""``geovae segment`` and ``geovae batch``: their shared options are generated from
:class:`~geovae.segment.options.SegmentOptions` (its fields' :class:`~geovae.segment.options.Flag`
metadata) and turned back into one, with the area and stacking options of a scene."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import click

from geovae.choices import POLYGON_FORMAT_NAMES, PolygonFormat
from geovae.cli.app import cli, is_quiet, quiet_native
from geovae.errors import OptionError
from geovae.segment.options import Flag, SegmentOptions

log = logging.getLogger(__name__)


def _formats(value: str) -> tuple[PolygonFormat, ...]:
    names = [f.strip().lower().lstrip(".") for f in value.split(",") if f.strip()]
    fmts = tuple(f for n in names for f in POLYGON_FORMAT_NAMES if n == f)
    if len(fmts) != len(names) or not fmts:
        raise click.BadParameter(f"{value!r}: choose from {', '.join(POLYGON_FORMAT_NAMES)} (comma-separated)")
    return fmts


def _click_option(name: str, default: Any, flag: Flag) -> Any:
    """The click option of one :class:`SegmentOptions` field, as its :class:`Flag` spells it."""
    decl = flag.flag or "--" + name.replace("_", "-")
    kw: dict[str, Any] = {"help": flag.help}
    if flag.show_default:
        kw["show_default"] = True
    if flag.kind == "flag":
        return click.option(decl, is_flag=True, **kw)
    if flag.kind == "switch":
        return click.option(f"{decl}/--no-{decl[2:]}", default=None, **kw)
    kw["default"] = flag.cli_default if flag.cli_default is not None else default
    if flag.kind == "int":
        low, high = (None if v is None else int(v) for v in (flag.low, flag.high))
        kw["type"] = click.IntRange(min=low, max=high, min_open=flag.low_open)
    elif flag.kind == "float":
        kw["type"] = (
            float if flag.low is None else click.FloatRange(min=flag.low, max=flag.high, min_open=flag.low_open)
        )
    elif flag.kind == "choice":
        kw["type"] = click.Choice(flag.choices)
    elif flag.kind == "formats":
        kw["callback"] = lambda c, p, v: None if v is None else _formats(v)
    return click.option(decl, **kw)


def _segment_flags() -> list[tuple[str, str, bool, Any]]:
    """``(field, click parameter, turns the option off, click option)`` of every segment
    option the command line has, in :class:`SegmentOptions`' order."""
    out = []
    for f in dataclasses.fields(SegmentOptions):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        decl = flag.flag or "--" + f.name.replace("_", "-")
        off = flag.flag is not None and flag.flag.startswith("--no-")
        out.append((f.name, decl[2:].replace("-", "_"), off, _click_option(f.name, f.default, flag)))
    return out


def _segment_options(f: Any) -> Any:
    for *_, opt in reversed(_segment_flags()):
        f = opt(f)
    return f


def _area_options(f: Any) -> Any:
    """Options that stack band assets or rasters into one scene and clip it to an area."""
    opts = [
        click.option(
            "--assets",
            help="SCENES are STAC Items (a JSON file or URL, an ItemCollection, stac-geoparquet): stack "
            "these band assets of each, in this order, into one scene, e.g. red,green,blue,nir.",
        ),
        click.option(
            "--stack", is_flag=True, help="Stack the SCENES rasters band-wise into one scene, on the first's grid."
        ),
        click.option(
            "--resolution",
            type=click.FloatRange(min=0, min_open=True),
            help="Pixel size of a stacked scene, in its CRS units [default: the finest asset's].",
        ),
        click.option("--bbox", help="Segment only this area: W,S,E,N in degrees (WGS84)."),
        click.option(
            "--intersects",
            type=click.Path(dir_okay=False),
            help="Segment only this area: a GeoJSON file (WGS84) of a polygon.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _area(kw: dict[str, Any]) -> dict[str, Any] | None:
    """The --bbox or --intersects area as a GeoJSON geometry (WGS84), or None."""
    from geovae.sources import parse_bbox, read_area

    if kw.get("bbox") and kw.get("intersects"):
        raise OptionError("--bbox and --intersects both name an area; give one of them")
    if kw.get("bbox"):
        w, s, e, n = parse_bbox(kw["bbox"])
        return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
    return read_area(kw["intersects"]) if kw.get("intersects") else None


def _scene_inputs(paths: list[str], kw: dict[str, Any]) -> list[Any]:
    """SCENES as the library takes them: paths, or stacked sources (--stack, --assets, an area)."""
    from geovae.sources import parse_assets, scene_inputs

    assets = parse_assets(kw["assets"]) if kw.get("assets") is not None else None
    return scene_inputs(paths, assets=assets, stack=kw["stack"], resolution=kw.get("resolution"), area=_area(kw))


def _segment_options_from(kw: dict[str, Any], quiet: bool) -> SegmentOptions:
    """The :class:`SegmentOptions` of a command's parsed segment options (``-q``: no progress)."""
    values: dict[str, Any] = {name: (not kw[param]) if off else kw[param] for name, param, off, _ in _segment_flags()}
    return SegmentOptions(**values, progress=not quiet)


@cli.command()
@click.argument("scenes", nargs=-1, required=True)
@click.option(
    "-m",
    "--model",
    required=True,
    help="Model file (geovae .safetensors or TorchGeo .ckpt), or torchgeo:NAME, a TorchGeo weight set "
    "(see geovae models).",
)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@_segment_options
@_area_options
@click.pass_context
def segment(ctx: click.Context, scenes: tuple[str, ...], model: str, out_dir: str, **kw: Any) -> None:
    """Segment SCENES into class/confidence rasters, polygons, a quicklook and a report.

    One scene writes into OUT. Several scenes, or a folder of them, go to the local batch
    runner (as `geovae batch` does): one sub-folder of OUT per scene, a manifest and a STAC
    catalog. With --assets, SCENES are STAC Items whose band assets are stacked into one
    scene each; with --stack, SCENES are stacked into one scene.
    """
    from geovae.batch import expand_scenes

    quiet_native()
    options = _segment_options_from(kw, is_quiet(ctx))
    paths = expand_scenes(scenes)
    inputs = _scene_inputs(paths, kw)
    if len(inputs) == 1 and (kw["stack"] or kw.get("assets") or paths == list(scenes)):
        from geovae.segment import segment_scene

        result = segment_scene(inputs[0], model, out_dir, options)
        print_outputs(result.outputs)
        return
    from geovae.batch import run_batch

    res = run_batch(inputs, model, out_dir, options=options, progress=not is_quiet(ctx))
    _print_batch(res)


def _print_batch(res: Any) -> None:
    click.echo(f"done {res.done}, skipped {res.skipped}, failed {res.failed}; manifest: {res.manifest}")
    if res.catalog is not None:
        click.echo(f"STAC catalog: {res.catalog}")
    if res.failed:
        raise SystemExit(1)


def print_outputs(outputs: dict[str, Any]) -> None:
    for name, path in outputs.items():
        click.echo(f"{name:>22}: {path}")


@cli.command()
@click.argument("scenes", nargs=-1)
@click.option("--list", "scene_list", type=click.Path(dir_okay=False), help="File with one scene path per line.")
@click.option(
    "-m",
    "--model",
    required=True,
    help="Model file (geovae .safetensors or TorchGeo .ckpt), readable by the workers, or torchgeo:NAME "
    "(a TorchGeo weight set; workers need it in their torch.hub cache: geovae export makes a file).",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(),
    help="Output folder: one sub-folder per scene, plus manifest.csv.",
)
@click.option("--scheduler", help="Address of a running Dask scheduler (tcp://host:8786). Default: a LocalCluster.")
@click.option("--workers", type=click.IntRange(min=1), help="LocalCluster workers [default: min(2, cores)].")
@click.option(
    "--threads-per-worker",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Scenes each local worker segments at once.",
)
@click.option("--resume/--no-resume", default=True, show_default=True, help="Skip scenes already done.")
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Extra attempts for a scene whose task failed unexpectedly (a dead worker, a crash).",
)
@click.option("--split-scene", is_flag=True, help="Spread each scene's blocks over the workers (one huge scene).")
@click.option(
    "--resources", help='Dask resources each scene task needs, e.g. "GPU=1" (workers started with --resources GPU=1).'
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to wait for --scheduler before giving up.",
)
@click.option(
    "--stac",
    help="Segment the STAC Items a search finds: a STAC API URL, or an item file or URL "
    "(stac-geoparquet, ItemCollection); filtered by --collections, --bbox/--intersects, "
    "--datetime, --query, --max-items; --assets picks the bands.",
)
@click.option("--collections", help="STAC collection ids to search, comma-separated.")
@click.option("--datetime", "date_range", help="Acquisition time or interval, e.g. 2024-06-01/2024-08-31.")
@click.option(
    "--query",
    multiple=True,
    help='A condition on an Item property, e.g. "eo:cloud_cover<20" (<, <=, >, >=, =, !=). Repeatable.',
)
@click.option("--max-items", type=click.IntRange(min=1), help="Segment at most this many Items.")
@_segment_options
@_area_options
@click.pass_context
def batch(
    ctx: click.Context,
    scenes: tuple[str, ...],
    scene_list: str | None,
    model: str,
    out_dir: str,
    scheduler: str | None,
    workers: int | None,
    threads_per_worker: int,
    resume: bool,
    retries: int,
    split_scene: bool,
    resources: str | None,
    connect_timeout: float,
    **kw: Any,
) -> None:
    """Segment many scenes (or one huge one) on dask.distributed, resumable, with retries.

    With --stac, the scenes are the STAC Items a search finds, each Item's --assets stacked
    into one scene and clipped to --bbox/--intersects.
    """
    from geovae.batch import run_batch

    quiet_native()
    if scheduler and workers:
        raise click.UsageError("--workers only applies to the local cluster; drop it with --scheduler")
    search = None
    if kw["stac"]:
        if scenes or scene_list:
            raise click.UsageError("--stac finds the scenes itself; drop the SCENE paths and --list")
        inputs, search = _stac_inputs(kw)
    else:
        for name, flag in (
            ("collections", "--collections"),
            ("date_range", "--datetime"),
            ("max_items", "--max-items"),
        ):
            if kw[name] is not None:
                raise click.UsageError(f"{flag} filters a --stac search; add --stac URL or drop it")
        if kw["query"]:
            raise click.UsageError("--query filters a --stac search; add --stac URL or drop it")
        if not scenes and not scene_list:
            raise click.UsageError("give SCENE paths, --list FILE or --stac")
        inputs = _scene_inputs(list(scenes), kw)
    res = run_batch(
        inputs,
        model,
        out_dir,
        scene_list=scene_list,
        scheduler=scheduler,
        workers=workers,
        threads_per_worker=threads_per_worker,
        resume=resume,
        retries=retries,
        split_scene=split_scene,
        resources=_resources(resources),
        connect_timeout=connect_timeout,
        progress=not is_quiet(ctx),
        options=_segment_options_from(kw, is_quiet(ctx)),
        search=search,
    )
    _print_batch(res)


def _stac_inputs(kw: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The scenes of a --stac search, and the search as the batch's Collection records it."""
    from geovae.sources import Search, find_items, item_sources, parse_assets, parse_bbox, parse_query, read_area

    if kw.get("assets") is None:
        raise click.UsageError("--stac: name the band assets to stack with --assets, e.g. --assets red,green,blue,nir")
    if kw["stack"]:
        raise click.UsageError("--stack stacks raster files; with --stac, --assets picks each Item's bands")
    assets = parse_assets(kw["assets"])
    if kw.get("bbox") and kw.get("intersects"):
        raise OptionError("--bbox and --intersects both name an area; give one of them")
    search = Search(
        source=kw["stac"],
        collections=tuple(c.strip() for c in kw["collections"].split(",") if c.strip()) if kw["collections"] else None,
        bbox=tuple(parse_bbox(kw["bbox"])) if kw.get("bbox") else None,
        intersects=read_area(kw["intersects"]) if kw.get("intersects") else None,
        datetime=kw["date_range"],
        query=parse_query(kw["query"]) or None,
        max_items=kw["max_items"],
    )
    items = find_items(search)
    log.info("the search found %d items", len(items))
    sources = item_sources(items, assets, resolution=kw.get("resolution"), area=search.area)
    return list(sources), {**search.describe(), "assets": assets, "resolution": kw.get("resolution")}


def _resources(value: str | None) -> dict[str, float] | None:
    if not value:
        return None
    out: dict[str, float] = {}
    for part in value.split(","):
        name, sep, amount = part.partition("=")
        try:
            out[name.strip()] = float(amount)
        except ValueError:
            raise click.BadParameter(
                f"{value!r}: write NAME=AMOUNT[,NAME=AMOUNT], e.g. GPU=1", param_hint="--resources"
            ) from None
        if not sep or not name.strip():
            raise click.BadParameter(f"{value!r}: write NAME=AMOUNT, e.g. GPU=1", param_hint="--resources")
    return out
