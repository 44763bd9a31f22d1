"""Fitting: one chain from a data module to a model file, shared by every way in.

data module -> statistics (the data module computed them) -> task -> fit -> what the model
saw (:func:`training_facts`) -> model file. :func:`train_model` enters it with an image and
its labels, :func:`geovae.training.train_from_config` with a YAML config; both end in
:func:`fit_and_save`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rasterio.windows import Window
from torch import Tensor

from geovae import signals
from geovae.atomic import check_not_inputs, check_output_file, check_output_suffix
from geovae.choices import CLASS_WEIGHTINGS, ClassWeighting, Sampler, ValSide
from geovae.device import resolve_device
from geovae.errors import OptionError, TrainingError
from geovae.model.base import ModelInfo, SegmentationModel
from geovae.model.encoders import encoder_weight_set
from geovae.training.arguments import (
    balanced_class_weights,
    check_finetuning,
    check_hyperparameters,
    data_arguments,
)
from geovae.training.callbacks import History, StopIfNotFinite, StopOnRequest
from geovae.training.datamodule import SceneDataModule
from geovae.training.task import VAESegmentationTask, task_defaults

__all__ = [
    "RECONSTRUCTION_QUANTILES",
    "TrainResult",
    "fit_and_save",
    "scene_task_arguments",
    "train_model",
    "training_facts",
]

log = logging.getLogger("geovae.training")

#: Quantiles of the trained model's own reconstruction error on training pixels that the
#: model file records (``ModelInfo.training``), for the trust check at prediction.
RECONSTRUCTION_QUANTILES = ("0.5", "0.9", "0.99", "0.995", "0.999")

#: At most this many training tiles are scored for those quantiles (evenly spread over the
#: training part, so the same model gives the same numbers), and at most this many pixels.
_FACT_TILES = 64
_FACT_PIXELS = 64 * 128 * 128

# Library use with few batches per epoch: these hints are noise to a geovae user.
_QUIET = (
    ".*does not have many workers.*",
    ".*number of training batches.*",
    ".*GPU available but not used.*",
    ".*Deprecated.*",
    ".*get_random_bounding_box.*",
    ".*LeafSpec.*",
    ".*treespec.*",
)


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        model_path: the model file written.
        metrics: final metrics (validation metrics of the last epoch, training loss terms).
        history: one dict of logged metrics per epoch.
        info: the description saved in the model file.
    """

    model_path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    info: ModelInfo | None = None


def _check_trained(module: torch.nn.Module, steps: int) -> None:
    """Refuse to save a model that did not train or holds non-finite numbers.

    Raises:
        TrainingError: no optimisation step was made, or a weight or buffer is NaN/inf.
    """
    if steps == 0:
        raise TrainingError(
            "the run made no optimisation step (max_epochs or max_steps 0, no training batches, or "
            "max_time too short), so no model was written; train for at least one step"
        )
    bad = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if not bool(t.isfinite().all())]
    if bad:
        raise TrainingError(
            f"the trained model holds non-finite numbers in {len(bad)} tensors (first: {bad[0]}); no model "
            "was written; try a lower learning rate or loss weights"
        )


def _trainer_kwargs(device: str, progress: bool) -> dict[str, Any]:
    dev = resolve_device(device)
    if dev.type == "cuda":
        prec = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return {"accelerator": "gpu", "devices": [dev.index or 0], "precision": prec}
    return {"accelerator": "cpu", "devices": 1, "precision": "32-true", "enable_progress_bar": progress}


def _predict_device(trainer_kwargs: Mapping[str, Any]) -> str:
    """The device a trained model predicts on after fitting: the one it trained on."""
    if trainer_kwargs.get("accelerator") == "gpu":
        devices = trainer_kwargs.get("devices") or [0]
        return f"cuda:{devices[0] if isinstance(devices, (list, tuple)) else 0}"
    return "cpu"


def _check_out(out: str | os.PathLike[str]) -> Path:
    path = check_output_file(out, example="model.safetensors")
    check_output_suffix(
        path,
        (".safetensors",),
        writes="train writes a safetensors model file",
        fix="for ONNX, export the trained file with geovae export --onnx",
    )
    return path


def _fit(
    task: pl.LightningModule, dm: pl.LightningDataModule, *, trainer_kwargs: dict[str, Any], has_val: bool
) -> tuple[list[dict[str, float]], dict[str, float], int]:
    """Fit ``task``; returns each epoch's metrics, the final metrics and the optimisation steps made.

    Raises:
        TrainingError: the loss became NaN or infinite (the run stops at that step).
        KeyboardInterrupt: Ctrl-C.
    """
    hist = History()
    kw = dict(trainer_kwargs)
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("enable_model_summary", False)
    kw.setdefault("num_sanity_val_steps", 0)
    kw.setdefault("log_every_n_steps", 1)
    kw["callbacks"] = [*list(kw.get("callbacks") or []), hist, StopIfNotFinite(), StopOnRequest()]
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    if not has_val:
        kw["limit_val_batches"] = 0
    prev = signal.getsignal(signal.SIGINT)
    # The warning filters hold for this fit only; the caller's are restored afterwards.
    with warnings.catch_warnings():
        for msg in _QUIET:
            warnings.filterwarnings("ignore", message=msg)
        trainer = pl.Trainer(**kw)
        try:
            trainer.fit(task, datamodule=dm)
        except SystemExit as exc:
            # Lightning answers Ctrl-C with sys.exit(1) and leaves SIGINT ignored, and SIGTERM
            # with its SIGTERMException (a SystemExit); a library caller (and the CLI's exit
            # codes 130 and 143) needs the KeyboardInterrupt or Terminated back, and no model
            # file may be written from an interrupted run.
            if isinstance(exc, SIGTERMException) or signals.requested() == signal.SIGTERM:
                signal.signal(signal.SIGINT, prev)
                raise signals.Terminated() from None
            if trainer.interrupted:
                signal.signal(signal.SIGINT, prev)
                raise KeyboardInterrupt from None
            raise
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, Tensor) and v.numel() == 1}
    return hist.epochs, final, int(trainer.global_step)


# ----------------------------------------------------------------------------- the chain
def scene_task_arguments(
    dm: SceneDataModule,
    given: Mapping[str, Any] | None = None,
    *,
    class_weighting: ClassWeighting | None = "inverse-sqrt",
    kl_warmup_epochs: float | None = None,
) -> dict[str, Any]:
    """Task arguments for training on a :class:`SceneDataModule`: the given ones, completed.

    Args:
        dm: the data module (band statistics, classes and label counts come from it).
        given: the user's task arguments (a config's ``model`` section, or train_model's).
        class_weighting: ``"inverse-sqrt"`` sets ``class_weights`` from the training labels
            (unless given); None leaves the plain mean over labelled pixels.
        kl_warmup_epochs: set ``kl_warmup_steps`` from the data's steps per epoch.

    Returns:
        Keyword arguments of :class:`VAESegmentationTask`.

    Raises:
        ModelMismatchError, ConfigError: given counts that differ from the data's.
        OptionError: an unknown ``class_weighting``.
    """
    if class_weighting is not None and class_weighting not in CLASS_WEIGHTINGS:
        raise OptionError(f"class_weighting {class_weighting!r}: use inverse-sqrt or null (None)")
    args = data_arguments(dm, given)
    if kl_warmup_epochs is not None:
        args["kl_warmup_steps"] = round(kl_warmup_epochs * dm.length / dm.batch_size)
    if class_weighting == "inverse-sqrt" and args.get("class_weights") is None:
        args["class_weights"] = balanced_class_weights(dm.train_class_counts)
    return args


def fit_and_save(
    dm: pl.LightningDataModule,
    task_args: Mapping[str, Any],
    out: Path,
    *,
    trainer_kwargs: dict[str, Any],
    tile_size: int,
    provenance: Mapping[str, Any] | None = None,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
) -> TrainResult:
    """Build the task, fit it, describe it and write the model file (atomically).

    Args:
        dm: the data module; a :class:`SceneDataModule` also gives validation availability,
            provenance and the training facts.
        task_args: keyword arguments of :class:`VAESegmentationTask`.
        out: the model file (already checked with :func:`geovae.atomic.check_output_file`).
        trainer_kwargs: :class:`lightning.pytorch.Trainer` arguments.
        tile_size: the training tile recorded in the model file.
        provenance: extra provenance for the model file (seed, config...).
        input_mean: per-band mean a foreign data module subtracted before the task.
        input_std: per-band divisor a foreign data module applied before the task.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingError: the loss went non-finite or no optimisation step was made; nothing
            is written.
    """
    scene = dm if isinstance(dm, SceneDataModule) else None
    has_val = True
    if scene is not None:
        has_val = scene.val_box is not None and scene.n_labelled["val"] != 0
        if scene.val_box is not None and not has_val:
            log.warning("no labelled pixels in the validation part; training without validation metrics")
    args = {k: v for k, v in task_args.items() if v is not None}
    task = VAESegmentationTask(**args)
    t0 = time.perf_counter()
    history, final, steps = _fit(task, dm, trainer_kwargs=trainer_kwargs, has_val=has_val)
    seconds = time.perf_counter() - t0
    _check_trained(task.model, steps)
    metrics = {k: v for k, v in final.items() if not math.isnan(v)}
    extra = {
        "data": scene.describe() if scene is not None else {},
        "metrics": metrics,
        "epochs": len(history),
        "seconds": round(seconds, 2),
        **dict(provenance or {}),
    }
    if scene is not None and scene.objects:
        # Where geovae segment --objects finds the boundary class (geovae.objects.boundary_class).
        extra["objects"] = dict(scene.objects)
    info = task.model_info(tile_size=int(tile_size), extra=extra, input_mean=input_mean, input_std=input_std)
    if scene is not None:
        info.training = training_facts(task.model, info, scene)
        from geovae.training.thresholds import learn_object_settings, raster_object_classes

        if scene.objects or raster_object_classes(scene)[0] is not None:
            # The seed threshold and minimum object size of segment --objects, chosen by
            # object F1 on the held-out part (extra.objects).
            learn_object_settings(task.model, info, scene, device=_predict_device(trainer_kwargs))
    from geovae.model import io as model_io

    # save_model writes to a temporary name in the same folder and renames it when complete.
    path = Path(model_io.save_model(out, task.model, info))
    return TrainResult(model_path=path, metrics=metrics, history=history, info=info)


def training_facts(module: torch.nn.Module, info: ModelInfo, dm: SceneDataModule) -> dict[str, Any]:
    """What the model was trained on, for the trust check (``ModelInfo.training``).

    ``dtype`` and per-band ``quantiles`` of the training image come from its band
    statistics; ``reconstruction_error_quantiles`` is the trained model's own per-pixel
    reconstruction error over the valid pixels of up to 64 training tiles (evenly spread
    over the training part, so the numbers are reproducible), measured exactly as
    :meth:`~geovae.model.base.SegmentationModel.predict` measures it at prediction (mean
    squared error over bands, normalised units, fp32 on the CPU).

    Args:
        module: the trained model (not changed: a copy is scored).
        info: its description (normalisation, tile size).
        dm: the data module it was trained with.

    Returns:
        ``{"dtype", "quantiles", "reconstruction_error_quantiles"}``; the last is left out
        when the model has no reconstruction decoder or the image has an alpha band.
    """
    facts: dict[str, Any] = {"dtype": dm.stats.dtype, "quantiles": dm.stats.quantiles}
    scene = dm.facts
    if not hasattr(module, "reconstruct") or scene.count != info.in_channels:
        return facts
    model = SegmentationModel(copy.deepcopy(module), info, "cpu", amp=False)
    tile = info.tile_size
    left, bottom, right, top = dm.train_box
    bounds, (rx, ry) = scene.bounds, scene.res
    c0, r0 = round((left - bounds.left) / rx), round((bounds.top - top) / ry)
    w, h = round((right - left) / rx), round((top - bottom) / ry)
    origins = [(r, c) for r in range(r0, r0 + h - tile + 1, tile) for c in range(c0, c0 + w - tile + 1, tile)]
    n = max(1, min(_FACT_TILES, _FACT_PIXELS // (tile * tile), len(origins)))
    picked = [origins[i] for i in np.linspace(0, len(origins) - 1, n).round().astype(int)] if origins else []
    fill = np.asarray(info.mean, dtype=np.float32)
    errors: list[np.ndarray] = []
    try:
        for start in range(0, len(picked), 8):
            batch, valid = [], []
            for r, c in picked[start : start + 8]:
                data, ok = scene.read(Window(c, r, tile, tile))
                batch.append(scene.fill_missing(data, ok, fill))
                valid.append(ok)
            err = model.predict(torch.from_numpy(np.stack(batch)), reconstruction=True)["reconstruction_error"]
            errors.append(err.cpu().numpy()[np.stack(valid)])
    finally:
        scene.close()
    values = np.concatenate(errors) if errors else np.zeros(0)
    if values.size:
        q = np.quantile(values.astype(np.float64), [float(k) for k in RECONSTRUCTION_QUANTILES])
        facts["reconstruction_error_quantiles"] = {
            k: float(v) for k, v in zip(RECONSTRUCTION_QUANTILES, q, strict=True)
        }
    return facts


# ----------------------------------------------------------------------------- train_model
def train_model(
    image: str | os.PathLike[str],
    labels: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = "model.safetensors",
    *,
    classes: str | Mapping[Any, Any] | None = None,
    vector_labels: str | os.PathLike[str] | None = None,
    label_field: str | None = None,
    unlabeled: Sequence[str | os.PathLike[str]] = (),
    epochs: int = 10,
    tile: int = 64,
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
    val_fraction: float = 0.25,
    val_side: ValSide = "east",
    lr: float | None = None,
    beta: float | None = None,
    free_bits: float | None = None,
    kl_warmup_epochs: float = 1.0,
    recon_weight: float | None = None,
    dice_weight: float | None = None,
    class_weighting: ClassWeighting | None = "inverse-sqrt",
    samples_per_epoch: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    max_time: float | None = None,
    base_channels: int | None = None,
    depth: int | None = None,
    latent_channels: int | None = None,
    encoder: str | None = None,
    sampler: Sampler = "random",
    adversarial: float | None = None,
    boundary_width: int | None = None,
    background: str | None = None,
    encoder_weights: str | None = None,
    freeze_encoder: bool = False,
    unfreeze_after: int | None = None,
    object_weight: float | None = None,
) -> TrainResult:
    """Train the VAE segmenter on one labelled scene and write a model file.

    Data flows through TorchGeo (:class:`~geovae.training.SceneDataModule`): random training
    patches from the training part of the scene, gridded validation patches from the part
    held out on ``val_side`` (``val_fraction`` of its width or height), unlabelled scenes as
    extra all-ignore batches. The model file is written atomically to ``out``.

    Args:
        image: the training image (any GDAL raster, local or remote).
        labels: label raster on the image's grid (value 0 or its nodata = unlabelled).
        out: model file to write (``.safetensors``).
        classes: ``"1:developed,5:forest"`` or ``{1: "developed"}``; None for every label
            id present. Colours come from the label raster's colour table when it has one.
        vector_labels: vector labels (GPKG, GeoJSON, shapefile) instead of ``labels``.
        label_field: attribute of ``vector_labels`` holding the class id or class name.
        unlabeled: extra scenes without labels (semi-supervised: reconstruction + KL only).
        epochs: training epochs.
        tile: patch size in pixels (a multiple of ``2**depth``).
        batch_size: patches per step.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; CUDA trains in mixed precision.
        seed: seed of weights, sampling and latent noise.
        val_fraction: share of the scene held out for validation (0 for none).
        val_side: side held out: east, west, north or south.
        lr: learning rate (AdamW). None, here and for every model argument below: the
            task's default (:func:`~geovae.training.task.task_defaults`).
        beta: final KL weight (the losses' per-pixel convention: 1 is the ELBO balance).
        free_bits: nats per latent channel and cell the KL does not penalise.
        kl_warmup_epochs: epochs over which the KL weight rises from 0 to ``beta``.
        recon_weight: weight of the reconstruction term.
        dice_weight: weight of a soft-Dice term added to the cross-entropy.
        class_weighting: ``"inverse-sqrt"`` weights the cross-entropy by 1/sqrt(class
            frequency) in the training part of the labels (rare classes count more, which
            mIoU rewards); None for the plain mean over labelled pixels.
        samples_per_epoch: training patches per epoch (default 4x the non-overlapping tiles).
        num_workers: DataLoader worker processes.
        progress: show a progress bar.
        max_time: stop after this many seconds of training (the last weights are saved).
        base_channels: model width.
        depth: number of stride-2 stages (model stride ``2**depth``).
        latent_channels: channels of the latent map.
        encoder: ``"unet"`` or ``"smp:<name>"``.
        sampler: training patches: ``"random"`` or ``"labelled"`` (every patch holds
            labels); see :class:`~geovae.training.SceneDataModule`.
        adversarial: weight of the PatchGAN critic on the reconstruction (VAE-GAN), 0 for
            none; see :class:`~geovae.training.terms.AdversarialTerm`.
        boundary_width: with ``vector_labels`` holding objects (fields, parcels, buildings),
            also train a ``boundary`` class this many pixels wide along every polygon's
            outline, and a ``background`` class (see ``background``), so that
            ``geovae segment --objects`` can keep touching objects apart.
        background: with ``boundary_width``: ``"extent"`` (default: pixels outside every
            polygon but inside the labels' bounding box are background), a vector file of
            the area the labels cover, or ``"none"``.
        encoder_weights: start from this TorchGeo encoder weight set
            (``ResNet18_Weights.LANDSAT_ETM_SR_MOCO``); see
            :class:`~geovae.training.VAESegmentationTask`.
        freeze_encoder: keep the pretrained encoder fixed (it is in the model file unchanged).
        unfreeze_after: with ``freeze_encoder``: keep it fixed for this many epochs (fewer
            than ``epochs``), then train it too.
        object_weight: with object labels (``boundary_width``, or a label raster with a class
            named ``boundary``), the weight of the object heads' and the boundary-aware
            losses (default 1; 0: a model without object heads); see
            :class:`~geovae.training.terms.ObjectTerm`.

    Returns:
        A :class:`TrainResult`.

    Raises:
        SceneError, LabelsError, OptionError, ModelMismatchError, OutputError: bad input,
            each with a one-line message; raised before any training.
    """
    out_path = _check_out(out)
    check_not_inputs([out_path], [image, labels, vector_labels, background, *unlabeled], fix="choose another --out")
    given = {
        "base_channels": base_channels,
        "depth": depth,
        "latent_channels": latent_channels,
        "encoder": encoder,
        "lr": lr,
        "beta": beta,
        "free_bits": free_bits,
        "recon_weight": recon_weight,
        "dice_weight": dice_weight,
        "adversarial": adversarial,
        "encoder_weights": encoder_weights,
        "freeze_encoder": freeze_encoder or None,
        "unfreeze_after": unfreeze_after,
        "object_weight": object_weight,
    }
    model_args = {k: v for k, v in given.items() if v is not None}
    if epochs < 1:
        raise OptionError(f"--epochs {epochs}: train for at least one epoch")
    depth = model_args.get("depth", task_defaults()["depth"])
    stride = 2**depth
    if tile % stride:
        raise OptionError(
            f"--tile {tile}: must be a multiple of the model stride {stride} (depth {depth}); "
            f"try {max(stride, round(tile / stride) * stride)}"
        )
    if class_weighting is not None and class_weighting not in CLASS_WEIGHTINGS:
        raise OptionError(f"class_weighting {class_weighting!r}: use None or 'inverse-sqrt'")
    if max_time is not None and max_time <= 0:
        raise OptionError(f"max_time {max_time}: give a positive number of seconds")
    if adversarial is not None and not (math.isfinite(adversarial) and adversarial >= 0):
        raise OptionError(f"--adversarial {adversarial}: give a finite weight of 0 (off) or more")
    check_hyperparameters({**model_args, "kl_warmup_epochs": kl_warmup_epochs}, prefix="")
    check_finetuning(encoder_weights, freeze_encoder, unfreeze_after, epochs, flags=True)
    if encoder_weights is not None:
        encoder_weight_set(encoder_weights)  # a name the VAE cannot use is refused before any data is read
    trainer_kw = _trainer_kwargs(device, progress)
    trainer_kw.update(max_epochs=epochs, enable_progress_bar=progress)
    if max_time is not None:
        trainer_kw["max_time"] = timedelta(seconds=float(max_time))
    pl.seed_everything(seed, workers=True, verbose=False)

    dm = SceneDataModule(
        str(image),
        str(labels) if labels else None,
        vector_labels=str(vector_labels) if vector_labels else None,
        label_field=label_field,
        classes=classes,
        unlabeled=[str(u) for u in unlabeled],
        tile=tile,
        batch_size=batch_size,
        val_fraction=val_fraction,
        val_side=val_side,
        samples_per_epoch=samples_per_epoch,
        num_workers=num_workers,
        seed=seed,
        sampler=sampler,
        boundary_width=boundary_width,
        background=background,
    )
    task_args = scene_task_arguments(dm, model_args, class_weighting=class_weighting, kl_warmup_epochs=kl_warmup_epochs)
    return fit_and_save(
        dm,
        task_args,
        out_path,
        trainer_kwargs=trainer_kw,
        tile_size=tile,
        provenance={"seed": seed, "batch_size": batch_size, "samples_per_epoch": dm.length},
    )
