"""The task's arguments: their ranges, the data-derived ones, and how they are completed.

:class:`~geovae.training.VAESegmentationTask`'s signature is the one source of every
argument's default (:func:`~geovae.training.task.task_defaults` reads it); this module holds
what is checked about them (:data:`NUMERIC_RANGES`, :func:`check_arguments`) and the one rule
by which the data-derived ones (:data:`DATA_ARGUMENTS`) come from a data module
(:func:`data_arguments`), for ``geovae train``, a config and ``torchgeo fit`` alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from geovae.errors import ConfigError, ModelMismatchError, OptionError

__all__ = [
    "DATA_ARGUMENTS",
    "NUMERIC_RANGES",
    "balanced_class_weights",
    "check_arguments",
    "check_finetuning",
    "check_hyperparameters",
    "data_arguments",
]

#: Task arguments that describe the data rather than the model; a data module such as
#: :class:`~geovae.training.SceneDataModule` determines them (see :func:`data_arguments`).
DATA_ARGUMENTS = (
    "in_channels",
    "num_classes",
    "labels",
    "class_ids",
    "class_colors",
    "band_names",
    "mean",
    "std",
    "nodata",
)


def data_arguments(datamodule: Any, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The task arguments ``given`` completed from a data module: one rule for every way in.

    The data module provides ``in_channels``, ``num_classes``, ``mean``, ``std``, ``nodata``,
    ``band_names`` and ``classes`` (a :class:`~geovae.classes.ClassSpec`), as
    :class:`~geovae.training.SceneDataModule` does. The data's values replace the given
    ones, except a given ``mean`` or ``std`` (a user's own normalisation; with
    ``encoder_weights`` the weight set's, which the task sets, not the scene's); a given
    ``in_channels`` or ``num_classes`` must equal the data's.

    Args:
        datamodule: the data module.
        given: task arguments given so far (a config's ``model`` section).

    Returns:
        ``given`` with every key of :data:`DATA_ARGUMENTS` set.

    Raises:
        ModelMismatchError: ``in_channels`` differs from the image's bands.
        ConfigError: ``num_classes`` differs from the data's classes, or the data module
            does not describe its data.
    """
    out = dict(given or {})
    bands, k = getattr(datamodule, "in_channels", None), getattr(datamodule, "num_classes", None)
    if not isinstance(bands, int) or not isinstance(k, int):
        raise ConfigError(
            f"data module {type(datamodule).__name__} does not give in_channels and num_classes; "
            f"set model in_channels and num_classes (or use geovae.training.SceneDataModule)"
        )
    where = getattr(datamodule, "image_path", "the data")
    if out.get("in_channels") is not None and out["in_channels"] != bands:
        raise ModelMismatchError(
            f"model.in_channels is {out['in_channels']} but image {where} has {bands} bands; "
            f"fix the config or the image"
        )
    if out.get("num_classes") is not None and out["num_classes"] != k:
        raise ConfigError(
            f"model.num_classes is {out['num_classes']} but the data has {k} classes; "
            f"drop model.num_classes or fix data.classes"
        )
    classes = getattr(datamodule, "classes", None)
    data = {
        "in_channels": bands,
        "num_classes": k,
        "band_names": getattr(datamodule, "band_names", None),
        "mean": getattr(datamodule, "mean", None),
        "std": getattr(datamodule, "std", None),
        "nodata": getattr(datamodule, "nodata", None),
        "labels": None,
        "class_ids": None,
        "class_colors": None,
    }
    if out.get("encoder_weights"):
        # A pretrained encoder expects its weights' normalisation, not the scene's (the task sets it).
        data["mean"] = data["std"] = None
    if classes is not None:
        data.update(
            labels=list(classes.names),
            class_ids=list(classes.ids),
            class_colors=[list(c) for c in classes.colors] or None,
        )
    for key in DATA_ARGUMENTS:
        if key in ("mean", "std") and out.get(key) is not None:
            continue
        out[key] = data[key]
    for key in ("mean", "std"):
        if out[key] is not None:
            out[key] = [float(v) for v in out[key]]
    return out


def balanced_class_weights(counts: Mapping[int, int]) -> list[float]:
    """Cross-entropy weights proportional to 1/sqrt(class frequency).

    Scaled so that the weighted mean over the training pixels is 1 (the loss keeps its
    scale). A class without training pixels gets the weight of a class with one pixel; it
    never appears in a training target, so only its documentation value matters.

    Args:
        counts: ``{class id: labelled training pixels}`` in output-channel order.

    Returns:
        One weight per class.
    """
    freq = torch.tensor([max(int(c), 1) for c in counts.values()], dtype=torch.float64)
    w = 1.0 / freq.sqrt()
    w = w * freq.sum() / (w * freq).sum()
    return [float(v) for v in w]


#: Numeric hyperparameters and the range each must lie in: ``(low, high, low inclusive,
#: high inclusive)``, None for no bound. A value outside (or not finite: NaN, inf) turns
#: the loss non-finite or the model untrainable, so it is refused before any data is read.
NUMERIC_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lr": (0.0, None, False, True),
    "weight_decay": (0.0, None, True, True),
    "patience": (0.0, None, True, True),
    "beta": (0.0, None, True, True),
    "free_bits": (0.0, None, True, True),
    "kl_warmup_steps": (0.0, None, True, True),
    "kl_warmup_epochs": (0.0, None, True, True),  # train_model's and a config's top-level key
    "recon_weight": (0.0, None, True, True),
    "dice_weight": (0.0, None, True, True),
    "sample_entropy": (0.0, None, True, True),
    "adversarial": (0.0, None, True, True),
    "adversarial_start": (0.0, None, True, True),
    "adversarial_lr": (0.0, None, False, True),
    "pseudo_label": (0.0, None, True, True),
    "pseudo_threshold": (0.0, 1.0, True, True),
    "generated_weight": (0.0, None, True, True),
    "object_weight": (0.0, None, True, True),
    "ema": (0.0, 1.0, True, False),
    "base_channels": (1.0, None, True, True),
    "depth": (1.0, None, True, True),
    "latent_channels": (1.0, None, True, True),
    "head_rank": (1.0, None, True, True),
    "train_samples": (1.0, None, True, True),
    "mixture_region": (0.0, None, True, True),
    "diversity_samples": (0.0, None, True, True),
    "unfreeze_after": (1.0, None, True, True),
}


def check_hyperparameters(args: Mapping[str, Any], prefix: str = "model.") -> None:
    """Refuse a numeric hyperparameter that is not finite or lies outside its range.

    Args:
        args: task arguments (missing keys and None are skipped).
        prefix: how the message names a key (``model.`` as in a config).

    Raises:
        OptionError: one line naming the key, its value and the range.
    """
    for key, (lo, hi, lo_in, hi_in) in NUMERIC_RANGES.items():
        v = args.get(key)
        if v is None or isinstance(v, bool):
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue  # a type error: the parser or the signature says so
        ok = math.isfinite(x)
        ok = ok and (lo is None or (x >= lo if lo_in else x > lo))
        ok = ok and (hi is None or (x <= hi if hi_in else x < hi))
        if not ok:
            lo_s = "" if lo is None else f"{'>=' if lo_in else '>'} {lo:g}"
            hi_s = "" if hi is None else f"{'<=' if hi_in else '<'} {hi:g}"
            want = " and ".join(s for s in (lo_s, hi_s) if s)
            raise OptionError(f"{prefix}{key} {v}: give a finite number {want}")
    for name in ("mean", "std", "class_weights"):
        vals = args.get(name)
        if vals is not None and not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vals):
            raise OptionError(f"{prefix}{name} {list(vals)}: every value must be a finite number")


def check_arguments(args: Mapping[str, Any]) -> None:
    """Per-band and per-class lists must match the counts (where the counts are known), and
    every numeric hyperparameter be finite and in range (:func:`check_hyperparameters`)."""
    check_hyperparameters(args)
    c, k = args.get("in_channels"), args.get("num_classes")
    for name in ("mean", "std", "band_names"):
        v = args.get(name)
        if v is not None and c is not None and len(v) != c:
            raise ModelMismatchError(f"{name} has {len(v)} values but in_channels is {c}; give one per band")
    for name in ("labels", "class_ids", "class_colors", "class_weights"):
        v = args.get(name)
        if v is not None and k is not None and len(v) != k:
            raise ModelMismatchError(f"{name} has {len(v)} values but num_classes is {k}; give one per class")
    std = args.get("std")
    if std is not None and any(s <= 0 for s in std):
        raise OptionError("std: every band's standard deviation must be positive")


def check_finetuning(
    encoder_weights: str | None,
    freeze_encoder: bool,
    unfreeze_after: int | None,
    epochs: int | None = None,
    *,
    flags: bool = False,
) -> None:
    """Refuse a combination of the fine-tuning arguments that does not say what to do.

    ``freeze_encoder`` and ``unfreeze_after`` act on pretrained weights; ``unfreeze_after``
    says when a frozen encoder starts training, so it needs ``freeze_encoder``, and fewer
    epochs than the run has (else the encoder would never train).

    Args:
        encoder_weights: the weight set's name, or None.
        freeze_encoder: whether the encoder starts frozen.
        unfreeze_after: the epoch it starts training at, or None.
        epochs: the run's epoch count, where known.
        flags: name the arguments as the command line spells them (``--freeze-encoder``),
            else as the task and a config do (``model.freeze_encoder``).

    Raises:
        OptionError: one line naming the arguments and what to give instead.
    """

    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else f"model.{key}"

    if not encoder_weights and (freeze_encoder or unfreeze_after is not None):
        given = name("freeze_encoder") if freeze_encoder else name("unfreeze_after")
        raise OptionError(f"{given} acts on pretrained weights: give {name('encoder_weights')} too")
    if unfreeze_after is not None and not freeze_encoder:
        raise OptionError(
            f"{name('unfreeze_after')} {unfreeze_after} says when a frozen encoder starts training: "
            f"give {name('freeze_encoder')} too"
        )
    if unfreeze_after is not None and epochs is not None and unfreeze_after >= epochs:
        epochs_name = "--epochs" if flags else "trainer.max_epochs"
        raise OptionError(
            f"{name('unfreeze_after')} {unfreeze_after} with {epochs_name} {epochs}: the encoder would never "
            f"train; give {name('unfreeze_after')} fewer than {epochs}, or {name('freeze_encoder')} alone"
        )
