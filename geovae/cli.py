"""The ``geovae`` command. Thin: it parses options and calls the library.

Exit codes: 0 success, 1 runtime error (bad input, failed scene...), 2 usage error (bad
option, unknown subcommand), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, what
schedulers and ``kill`` send). A :class:`~geovae.errors.GeovaeError` and a usage error are
printed as one line; ``--debug`` shows the traceback as well.

Process-wide settings (logging, signal handlers) are made here, at the entry point, never
by the library.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
from typing import Any

import click

from geovae import signals
from geovae._version import __version__
from geovae.choices import CONNECTIVITIES, POLYGON_FORMAT_NAMES, SAMPLERS, PolygonFormat, Sampler
from geovae.errors import GeovaeError, OptionError
from geovae.segment.options import Flag, SegmentOptions

log = logging.getLogger("geovae")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test harness or a notebook may swap it)."""

    #: marks geovae's own handler, so that a second setup does not add another
    _geovae = True

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Formatter(logging.Formatter):
    """``geovae: warning: ...`` for geovae's own messages, ``name: level: ...`` for others'."""

    def format(self, record: logging.LogRecord) -> str:
        who = "geovae" if record.name.split(".")[0] == "geovae" else record.name
        return f"{who}: {record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(verbosity: int) -> None:
    """-q: errors only; default: warnings; -v: one line per stage; -vv: debug, third parties too."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger()
    if not any(getattr(h, "_geovae", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
    # Third-party libraries (matplotlib's font manager, Lightning's banners, distributed's
    # cluster chatter) stay at WARNING unless -vv asks for everything.
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    logging.getLogger("geovae").setLevel(level)
    for noisy in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "distributed",
        "rasterio",
        "matplotlib",
    ):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity >= 2 else max(level, logging.WARNING))


def _quiet_native() -> None:
    """GDAL's and libtiff's own printing to stderr off (below -vv), for the commands that
    write: their errors reach geovae as exceptions, which become one line
    (:func:`geovae.native.quiet_native_output`)."""
    if STATE.verbosity < 2:
        from geovae.native import quiet_native_output

        quiet_native_output()


def _quiet_lightning() -> None:
    """Lightning's import sets its loggers to INFO and adds its own console handler, undoing
    :func:`_setup_logging` (every banner then printed twice, once in each format). Called by
    the commands that train, after importing Lightning: its records go through geovae's
    handler only, at the level ``_setup_logging`` chose for third parties."""
    import lightning
    import lightning.fabric
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:  # Lightning's own console handler
                lg.removeHandler(h)
        lg.propagate = True
    _setup_logging(STATE.verbosity)  # the levels again, now that the import has reset them


class _State:
    debug: bool = False
    verbosity: int = 0


STATE = _State()


def _verbosity_params() -> list[click.Option]:
    """-v/-q/--debug for a subcommand, so they work after it as well as before it."""

    def more(ctx: click.Context, param: click.Parameter, value: int) -> None:
        if value:
            STATE.verbosity = max(STATE.verbosity, 0) + value
            _setup_logging(STATE.verbosity)

    def quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            STATE.verbosity = -1
            _setup_logging(-1)

    def debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        STATE.debug = STATE.debug or value

    return [
        click.Option(
            ["-v", "--verbose", "_verbose"],
            count=True,
            expose_value=False,
            callback=more,
            help="More log output: one line per stage (-vv for debug, third-party logs too).",
        ),
        click.Option(
            ["-q", "--quiet", "_quiet"],
            is_flag=True,
            expose_value=False,
            callback=quiet,
            help="Only errors; no progress bars.",
        ),
        click.Option(
            ["--debug", "_debug"],
            is_flag=True,
            expose_value=False,
            callback=debug,
            help="Show the full traceback of errors.",
        ),
    ]


def _formats(value: str) -> tuple[PolygonFormat, ...]:
    names = [f.strip().lower().lstrip(".") for f in value.split(",") if f.strip()]
    fmts = tuple(f for n in names for f in POLYGON_FORMAT_NAMES if n == f)
    if len(fmts) != len(names) or not fmts:
        raise click.BadParameter(f"{value!r}: choose from {', '.join(POLYGON_FORMAT_NAMES)} (comma-separated)")
    return fmts


def _quiet(ctx: click.Context) -> bool:
    return STATE.verbosity < 0


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="geovae")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """geovae: large satellite scenes to land-cover maps and polygons.

    Start with `geovae demo`, which trains the VAE segmenter on a real Landsat scene and
    segments it end to end.
    """
    STATE.debug = debug
    STATE.verbosity = -1 if quiet else verbose
    _setup_logging(STATE.verbosity)


# ----------------------------------------------------------------------------- info
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


# -------------------------------------------------------------------------- segment
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

    _quiet_native()
    options = _segment_options_from(kw, _quiet(ctx))
    paths = expand_scenes(scenes)
    inputs = _scene_inputs(paths, kw)
    if len(inputs) == 1 and (kw["stack"] or kw.get("assets") or paths == list(scenes)):
        from geovae.segment import segment_scene

        result = segment_scene(inputs[0], model, out_dir, options)
        _print_outputs(result.outputs)
        return
    from geovae.batch import run_batch

    res = run_batch(inputs, model, out_dir, options=options, progress=not _quiet(ctx))
    _print_batch(res)


def _print_batch(res: Any) -> None:
    click.echo(f"done {res.done}, skipped {res.skipped}, failed {res.failed}; manifest: {res.manifest}")
    if res.catalog is not None:
        click.echo(f"STAC catalog: {res.catalog}")
    if res.failed:
        raise SystemExit(1)


def _print_outputs(outputs: dict[str, Any]) -> None:
    for name, path in outputs.items():
        click.echo(f"{name:>22}: {path}")


# ------------------------------------------------------------------------ vectorize
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
    help="With --objects: interior probability at which a pixel seeds an object.",
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
    _quiet_native()
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
        click.echo(f"{ores.n_objects} objects")
        for p in ores.paths:
            click.echo(f"  {p}")
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
    click.echo(f"{res.n_polygons} polygons")
    for p in res.paths:
        click.echo(f"  {p}")


# ---------------------------------------------------------------------------- train
@cli.command()
@click.option("--config", type=click.Path(dir_okay=False), help="LightningCLI-style YAML (see configs/).")
@click.option("--image", help="Training image (any GDAL raster).")
@click.option("--labels", help="Label raster on the image's grid (0 or its nodata = unlabelled).")
@click.option("--vector-labels", help="Vector labels (GPKG, GeoJSON, shapefile) instead of --labels.")
@click.option("--label-field", help="Attribute of --vector-labels holding the class id.")
@click.option("--classes", help='Class ids and names, e.g. "1:developed,5:forest".')
@click.option("--unlabeled", multiple=True, help="Extra unlabelled scenes (semi-supervised). Repeatable.")
@click.option("-o", "--out", default="model.safetensors", show_default=True, help="Model file to write.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Training epochs.")
@click.option(
    "--tile",
    type=click.IntRange(min=16),
    default=64,
    show_default=True,
    help="Training patch size in pixels (a multiple of the model stride); the default prediction tile.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Patches per step.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, sampling and latent noise.")
@click.option(
    "--sampler",
    type=click.Choice(SAMPLERS),
    default="random",
    show_default=True,
    help="Training patches anywhere in the training part (random) or each holding labels (labelled: "
    "for sparse labels without --unlabeled).",
)
@click.option(
    "--adversarial",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Train the reconstruction decoder against a PatchGAN critic with this weight (VAE-GAN; "
    "sharper reconstructions and generated images) [default: 0, off]. With --config it sets "
    "model.adversarial.",
)
@click.option(
    "--boundary-width",
    type=click.IntRange(min=1),
    help="Object labels: train a 'boundary' class this many pixels wide along every polygon's outline "
    "(and a 'background' class), so `segment --objects` keeps touching objects apart.",
)
@click.option(
    "--background",
    help="With --boundary-width, where pixels outside every polygon are background: "
    "extent (the labels' bounding box; default), none, or a vector file of the area "
    "the labels cover. Elsewhere they are unlabelled.",
)
@click.option(
    "--encoder-weights",
    help="Start from a pretrained TorchGeo encoder, e.g. ResNet18_Weights.LANDSAT_ETM_SR_MOCO "
    "(`geovae models --kind encoder`); the image must have its bands. With --config it sets "
    "model.encoder_weights.",
)
@click.option("--freeze-encoder", is_flag=True, help="Keep the pretrained encoder fixed (with --encoder-weights).")
@click.option(
    "--unfreeze-after",
    type=click.IntRange(min=1),
    help="With --freeze-encoder: keep it fixed for this many epochs (fewer than --epochs), then train it too.",
)
@click.option("--set", "overrides", multiple=True, help="Override a config key, e.g. --set trainer.max_epochs=3.")
@click.pass_context
def train(
    ctx: click.Context,
    config: str | None,
    image: str | None,
    labels: str | None,
    vector_labels: str | None,
    label_field: str | None,
    classes: str | None,
    unlabeled: tuple[str, ...],
    out: str,
    epochs: int,
    tile: int,
    batch_size: int,
    device: str,
    seed: int,
    sampler: Sampler,
    adversarial: float | None,
    boundary_width: int | None,
    background: str | None,
    encoder_weights: str | None,
    freeze_encoder: bool,
    unfreeze_after: int | None,
    overrides: tuple[str, ...],
) -> None:
    """Train the VAE segmenter from a YAML config or from an image and its labels."""
    from geovae import training

    _quiet_native()
    _quiet_lightning()

    if config:
        if image or labels or vector_labels or boundary_width or background:
            raise OptionError(
                "--config and --image/--labels/--boundary-width are exclusive; put them in the config "
                "(data.boundary_width, data.background)"
            )
        if adversarial is not None:
            overrides = (*overrides, f"model.adversarial={adversarial}")
        if encoder_weights is not None:
            overrides = (*overrides, f"model.encoder_weights={encoder_weights}")
        if freeze_encoder:
            overrides = (*overrides, "model.freeze_encoder=true")
        if unfreeze_after is not None:
            overrides = (*overrides, f"model.unfreeze_after={unfreeze_after}")
        result = training.train_from_config(config, overrides=overrides)
    else:
        if not image or not (labels or vector_labels):
            raise OptionError("give --config, or --image with --labels (or --vector-labels and --label-field)")
        if overrides:
            raise OptionError("--set only applies to --config")
        result = training.train_model(
            image,
            labels,
            out,
            classes=classes,
            vector_labels=vector_labels,
            label_field=label_field,
            unlabeled=unlabeled,
            epochs=epochs,
            tile=tile,
            batch_size=batch_size,
            device=device,
            seed=seed,
            sampler=sampler,
            progress=not _quiet(ctx),
            adversarial=adversarial,
            boundary_width=boundary_width,
            background=background,
            encoder_weights=encoder_weights,
            freeze_encoder=freeze_encoder,
            unfreeze_after=unfreeze_after,
        )
    click.echo(f"model: {result.model_path}")
    for k, v in sorted(result.metrics.items()):
        if isinstance(v, float):
            click.echo(f"  {k}: {v:.4f}")


# ------------------------------------------------------------------------- generate
@cli.command()
@click.option("--model", "model_path", required=True, help="A geovae model file (VAE segmenter).")
@click.option(
    "-o", "--out", required=True, help="GeoTIFF to write (.tif or .tiff): N images x the model's bands, at most 65,535."
)
@click.option("--n", "count", type=click.IntRange(min=1), default=16, show_default=True, help="Images to generate.")
@click.option(
    "--size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Height and width of each image (a multiple of the model stride); ignored with --classes-from.",
)
@click.option("--classes-from", help="Class raster whose layout (and grid) the images follow.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the latent samples.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def generate(
    model_path: str, out: str, count: int, size: int, classes_from: str | None, seed: int, device: str
) -> None:
    """Decode latent samples from the model's prior into multi-band image tiles.

    Values are in the model's band units (its training data type when recorded). With
    --classes-from each image follows that class map and lies on its grid.
    """
    from geovae.generate import generate_images

    _quiet_native()
    res = generate_images(model_path, out, n=count, size=size, classes_from=classes_from, seed=seed, device=device)
    where = "on the class map's grid" if res.georeferenced else "not georeferenced"
    click.echo(
        f"{res.path}: {res.count} images of {res.width}x{res.height} px, {res.bands} bands each ({res.dtype}, {where})"
    )


# ------------------------------------------------------------------------- evaluate
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


@cli.command("export")
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (.safetensors).")
@click.option(
    "--mean", help="Per-band mean subtracted first: one number for all bands or one per band, comma-separated."
)
@click.option("--std", help="Per-band divisor after the mean: one number or one per band.")
@click.option(
    "--stats-from",
    type=click.Path(dir_okay=False),
    help="Compute mean and std scene-wide from this raster (as geovae train does).",
)
@click.option("--classes", help='One ID:NAME per output channel in channel order, e.g. "1:developed,5:forest".')
@click.option("--tile", type=click.IntRange(min=1), help="Default prediction tile size recorded in the file.")
@click.option(
    "--onnx",
    "as_onnx",
    is_flag=True,
    help="Write an ONNX graph (model.onnx) for onnxruntime, with the same description in its metadata; "
    "checked against the torch model first. Needs pip install geovae[onnx].",
)
@click.option(
    "--check-with",
    type=click.Path(dir_okay=False),
    help="With --onnx: check the graph on tiles of this raster [default: --stats-from, else random "
    "tiles in the training range].",
)
def export(
    source: str,
    out: str,
    mean: str | None,
    std: str | None,
    stats_from: str | None,
    classes: str | None,
    tile: int | None,
    as_onnx: bool,
    check_with: str | None,
) -> None:
    """Write SOURCE (a geovae model file, a TorchGeo checkpoint, or torchgeo:NAME) as a
    self-describing geovae model file (.safetensors, or .onnx with --onnx).

    The file records the band normalisation and class ids/names that a TorchGeo checkpoint
    lacks, so geovae segment and geovae batch need nothing else. For a TorchGeo weight set
    (torchgeo:NAME, see geovae models) it records the weight set's own normalisation, bands,
    classes and licence: batch workers and machines without network need only the file.
    """
    from geovae.model.io import export_model

    _quiet_native()
    p = export_model(
        source,
        out,
        mean=mean,
        std=std,
        stats_from=stats_from,
        classes=classes,
        tile_size=tile,
        onnx=as_onnx,
        check_with=check_with,
    )
    if as_onnx:
        from geovae.model.onnx import describe_check

        click.echo(describe_check(p))
    click.echo(str(p))


# --------------------------------------------------------------------------- models
@cli.command()
@click.option(
    "--kind",
    type=click.Choice(["segmentation", "encoder"]),
    help="Only segmentation models (for segment) or only encoders (for train) [default: both].",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (every field).")
def models(kind: str | None, as_json: bool) -> None:
    """List TorchGeo's pretrained weight sets geovae can use, read from TorchGeo itself.

    Segmentation models run as they are: geovae segment SCENE --model torchgeo:NAME.
    Encoders are pretrained backbones to start training from. Weights download into
    torch.hub's cache ($TORCH_HOME/hub/checkpoints) on first use; "cached" says which are
    there already.
    """
    from geovae.model.pretrained import catalogue

    sets = catalogue(kind)  # type: ignore[arg-type]  # click.Choice gives one of the kinds
    if as_json:
        click.echo(json.dumps([w.to_dict() for w in sets], indent=2))
        return
    for k, title in (
        ("segmentation", "Segmentation models (geovae segment --model torchgeo:NAME)"),
        ("encoder", "Encoders (for train)"),
    ):
        rows = [w for w in sets if w.kind == k]
        if not rows:
            continue
        click.echo(title + ":")
        table = [
            ["name", "data", "bands", "classes" if k == "segmentation" else "architecture", "res", "licence", "cached"]
        ]
        for w in rows:
            table.append(
                [
                    w.name,
                    w.dataset or "-",
                    f"{w.in_channels}" + (f" ({','.join(w.bands)})" if w.bands else ""),
                    ",".join(w.class_names or []) if k == "segmentation" else w.architecture,
                    f"{w.resolution:g} m" if w.resolution else "-",
                    w.license or "not stated",
                    f"{w.size / 2**20:.0f} MiB" if w.cached and w.size is not None else "no",
                ]
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            click.echo("  " + "  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip())
        click.echo("")


# ---------------------------------------------------------------------------- batch
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

    _quiet_native()
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
        progress=not _quiet(ctx),
        options=_segment_options_from(kw, _quiet(ctx)),
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


# ----------------------------------------------------------------------------- demo
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
    _quiet_native()
    _quiet_lightning()

    res = run_demo(out_dir, data=data, epochs=epochs, device=device, progress=not _quiet(ctx))
    click.echo("")
    ev = res.report["evaluation"]
    auroc = ev.get("auroc_uncertainty")
    click.echo(
        f"mIoU on the east half (held out): {ev['miou']:.3f}   ECE: {ev['ece']:.3f}   "
        f"uncertainty AUROC for errors: {'n/a' if auroc is None else format(auroc, '.3f')} "
        f"({ev.get('uncertainty_source') or 'none'})"
    )
    _print_outputs(res.outputs)


# ----------------------------------------------------------------------------- view
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


# ----------------------------------------------------------------------------- main
for _cmd in cli.commands.values():
    _cmd.params.extend(_verbosity_params())


def _usage_line(e: click.ClickException) -> str:
    """A usage error as one line that names the fix: the message and where help is."""
    msg = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    where = (
        f"geovae {ctx.command_path.split(' ', 1)[1]} --help"
        if ctx is not None and " " in ctx.command_path
        else "geovae --help"
    )
    return f"geovae: error: {msg}; see `{where}`"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``geovae`` console script; returns the exit code.

    Args:
        argv: the arguments; None (the console script, ``python -m geovae``) reads the
            process's own command line, and the process is taken to end when this returns:
            SIGINT and SIGTERM are then ignored rather than restored (see
            :func:`geovae.signals.installed`).
    """
    STATE.debug, STATE.verbosity = False, 0
    # Ctrl-C and SIGTERM (a scheduler's or `kill`'s stop) set a flag that the run's loops
    # check (geovae.signals): the run unwinds from there, every writer removes its temporary
    # files on the way out, and the exit status says what happened.
    with signals.installed(exiting=argv is None):
        code = _run(argv)
        if code == 0 and signals.requested() is not None:
            # Stopped after the last check (the outputs, if any, are complete): still say so.
            return _stopped(signals.requested())
        return code


def _stopped(signum: int | None) -> int:
    if signum == signal.SIGTERM:
        click.echo("geovae: terminated", err=True)
        return 143
    click.echo("geovae: interrupted", err=True)
    return 130


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="geovae", standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        click.echo("geovae: interrupted", err=True)
        return 130
    except click.ClickException as e:  # usage errors: one line, like every other user error
        click.echo(_usage_line(e), err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except GeovaeError as e:
        if STATE.debug:
            raise
        click.echo(f"geovae: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("geovae: interrupted", err=True)
        return 130
    except signals.Terminated:
        click.echo("geovae: terminated", err=True)
        return 143
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:  # a bug, not a user error: say so and how to see more
        if STATE.debug:
            raise
        click.echo(f"geovae: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        return 1
