"""The commands about models: ``geovae train``, ``generate``, ``export`` and ``models``."""

from __future__ import annotations

import json

import click

from geovae.choices import SAMPLERS, Sampler
from geovae.cli.app import cli, is_quiet, quiet_lightning, quiet_native
from geovae.errors import OptionError

#: Options of ``train`` that a config sets itself: with ``--config`` they were silently
#: ignored, so they are refused, naming the config key (``data.init_args.X`` where the config's
#: data section has a ``class_path``).
CONFIG_KEYS = {
    "epochs": "trainer.max_epochs",
    "tile": "data.tile",
    "batch_size": "data.batch_size",
    "device": "trainer.accelerator",
    "seed": "seed_everything",
    "sampler": "data.sampler",
    "classes": "data.classes",
    "unlabeled": "data.unlabeled",
    "label_field": "data.label_field",
}


@cli.command()
@click.option("--config", type=click.Path(dir_okay=False), help="LightningCLI-style YAML (see configs/).")
@click.option("--image", help="Training image (any GDAL raster).")
@click.option("--labels", help="Label raster on the image's grid (0 or its nodata = unlabelled).")
@click.option("--vector-labels", help="Vector labels (GPKG, GeoJSON, shapefile) instead of --labels.")
@click.option("--label-field", help="Attribute of --vector-labels holding the class id.")
@click.option("--classes", help='Class ids and names, e.g. "1:developed,5:forest".')
@click.option("--unlabeled", multiple=True, help="Extra unlabelled scenes (semi-supervised). Repeatable.")
@click.option(
    "-o",
    "--out",
    default="model.safetensors",
    show_default=True,
    help="Model file to write (.safetensors). With --config it sets out.",
)
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
    "--object-weight",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Object labels: weight of the object heads (extent, distance to the outline) and of the "
    "boundary-aware loss [default: 1; 0: no object heads]. With --config it sets model.object_weight.",
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
    object_weight: float | None,
    background: str | None,
    encoder_weights: str | None,
    freeze_encoder: bool,
    unfreeze_after: int | None,
    overrides: tuple[str, ...],
) -> None:
    """Train the VAE segmenter from a YAML config or from an image and its labels."""
    from geovae import training

    quiet_native()
    quiet_lightning()

    if config:
        if image or labels or vector_labels or boundary_width or background:
            raise OptionError(
                "--config and --image/--labels/--boundary-width are exclusive; put them in the config "
                "(data.boundary_width, data.background)"
            )
        for name, key in CONFIG_KEYS.items():
            if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT):
                flag = "--" + name.replace("_", "-")
                raise OptionError(
                    f"{flag} does not apply with --config (the config decides it); set {key} in the config "
                    f"or pass --set {key}=VALUE"
                )
        if ctx.get_parameter_source("out") is not click.core.ParameterSource.DEFAULT:
            overrides = (*overrides, f"out={out}")
        if adversarial is not None:
            overrides = (*overrides, f"model.adversarial={adversarial}")
        if encoder_weights is not None:
            overrides = (*overrides, f"model.encoder_weights={encoder_weights}")
        if object_weight is not None:
            overrides = (*overrides, f"model.object_weight={object_weight}")
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
            progress=not is_quiet(ctx),
            adversarial=adversarial,
            boundary_width=boundary_width,
            background=background,
            encoder_weights=encoder_weights,
            freeze_encoder=freeze_encoder,
            unfreeze_after=unfreeze_after,
            object_weight=object_weight,
        )
    click.echo(f"model: {result.model_path}")
    for k, v in sorted(result.metrics.items()):
        if isinstance(v, float):
            click.echo(f"  {k}: {v:.4f}")


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

    quiet_native()
    res = generate_images(model_path, out, n=count, size=size, classes_from=classes_from, seed=seed, device=device)
    where = "on the class map's grid" if res.georeferenced else "not georeferenced"
    click.echo(
        f"{res.path}: {res.count} images of {res.width}x{res.height} px, {res.bands} bands each ({res.dtype}, {where})"
    )


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

    quiet_native()
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
