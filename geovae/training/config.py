"""Training from a LightningCLI-style YAML config: ``geovae train --config X.yaml [--set k=v]``.

The parser is Lightning's own :class:`~lightning.pytorch.cli.LightningArgumentParser`
(jsonargparse), generated from the signatures as :class:`~lightning.pytorch.cli.LightningCLI`
generates it: ``model`` from :class:`~geovae.training.VAESegmentationTask`, ``data`` from any
Lightning data module by ``class_path`` (:class:`~geovae.training.SceneDataModule` when the
section has none), ``trainer`` from :class:`lightning.pytorch.Trainer`. ``--set a.b=v`` is
jsonargparse's ``--a.b=v``. geovae adds a few top-level keys (``out``, ``tile_size``,
``kl_warmup_epochs``, ``class_weighting``), a one-line :class:`~geovae.errors.ConfigError`
for every parse error, relative data paths read from the working directory else from the
config's folder, and the data-derived task arguments (bands, classes, normalisation). Then
it runs the same chain as :func:`~geovae.training.train_model`.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from geovae.atomic import check_not_inputs
from geovae.choices import CLASS_WEIGHTINGS
from geovae.errors import ConfigError, GeovaeError, OptionError
from geovae.training.arguments import check_hyperparameters
from geovae.training.datamodule import SceneDataModule
from geovae.training.fit import TrainResult, _check_out, fit_and_save, scene_task_arguments
from geovae.training.task import VAESegmentationTask

__all__ = ["config_parser", "load_config", "train_from_config"]

_TASK = "geovae.training.VAESegmentationTask"
_DATA = "geovae.training.SceneDataModule"
#: Arguments of SceneDataModule that name files.
_PATH_KEYS = ("image", "labels", "vector_labels")


def config_parser() -> Any:
    """The parser of training configs (a LightningArgumentParser; see the module docstring).

    Returns:
        The parser; it raises ``argparse.ArgumentError`` instead of exiting.
    """
    from jsonargparse import ActionConfigFile
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser

    p = LightningArgumentParser(
        prog="geovae train --config",
        description="Train the VAE segmenter.",
        exit_on_error=False,
        default_env=False,
        allow_abbrev=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="The YAML file.")
    p.add_argument("--seed_everything", type=int, default=0, help="Seed of weights, sampling and noise.")
    p.add_argument("--out", type=str, default="model.safetensors", help="Model file to write.")
    p.add_argument(
        "--tile_size",
        type=int | None,
        default=None,
        help="Training tile recorded in the model file (default: data.init_args.tile or patch_size).",
    )
    p.add_argument(
        "--kl_warmup_epochs",
        type=float | None,
        default=None,
        help="Set model.kl_warmup_steps from epochs (needs a SceneDataModule).",
    )
    p.add_argument(
        "--class_weighting",
        type=str | None,
        default="inverse-sqrt",
        help="inverse-sqrt (from the training labels) or null; ignored when model.class_weights is set.",
    )
    # Data-derived task arguments default to None: "take it from the data".
    p.add_subclass_arguments(VAESegmentationTask, "model", instantiate=False, required=False, fail_untyped=False)
    p.add_subclass_arguments(LightningDataModule, "data", instantiate=False, required=True, fail_untyped=False)
    p.add_lightning_class_args(pl.Trainer, "trainer")
    # A model section without class_path is geovae's task (LightningCLI's non-subclass mode);
    # for the data section see _parse.
    p.set_defaults({"model": {"class_path": _TASK}, "trainer.max_epochs": 10})
    return p


def _parse(path: str | os.PathLike[str], overrides: Sequence[str]) -> tuple[Any, Any]:
    import yaml

    p = str(path)
    if not Path(p).is_file():
        raise ConfigError(f"config {p}: no such file; check the path (examples are in configs/)")
    try:
        raw = yaml.safe_load(Path(p).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p}: not valid YAML ({_first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {p}: expected a mapping with model/data/trainer sections")
    args = ["--config", p]
    if isinstance(raw.get("data"), dict) and "class_path" not in raw["data"]:
        # A data section without class_path is SceneDataModule's arguments. Not a parser
        # default: jsonargparse would carry its defaults (batch_size...) into another class.
        args.insert(0, f"--data.class_path={_DATA}")
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {o!r}: expected KEY=VALUE such as trainer.max_epochs=3")
        args.append(f"--{key.strip()}={value}")
    parser = config_parser()
    try:
        cfg = parser.parse_args(args)
    except Exception as e:  # jsonargparse raises ArgumentError/TypeError/ValueError with long text
        raise ConfigError(f"config {p}: {_explain(_first_line(e), parser, raw)}") from None
    if cfg.model is None:
        cfg.model = parser.get_defaults().model
    if _class(cfg.model.class_path) is not VAESegmentationTask:
        raise ConfigError(f"config {p}: model.class_path {cfg.model.class_path!r} is not supported; use {_TASK}")
    if issubclass(_class(cfg.data.class_path), SceneDataModule):
        base = Path(p).resolve().parent
        ia = cfg.data.init_args
        for key in _PATH_KEYS:
            if isinstance(ia.get(key), str):
                ia[key] = _resolve_path(ia[key], base)
        ia.unlabeled = [_resolve_path(str(u), base) for u in (ia.get("unlabeled") or [])]
    return parser, cfg


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _resolve_path(value: str, base: Path) -> str:
    """A relative path in a config: from the working directory (as LightningCLI reads it),
    else from the config file's folder."""
    if "://" in value or value.startswith("/vsi") or os.path.isabs(value) or Path(value).exists():
        return value
    alt = base / value
    return str(alt) if alt.exists() else value


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Any:
    """Read and validate a training config (without training).

    Args:
        path: the YAML file.
        overrides: ``"section.key=value"`` strings applied after the file
            (e.g. ``"trainer.max_epochs=3"``).

    Returns:
        The validated jsonargparse namespace: ``model`` holds the task's arguments,
        ``data`` the data module's ``class_path`` and ``init_args``, ``trainer`` the
        Trainer's arguments, and the top-level keys.

    Raises:
        ConfigError: if the file is missing, not YAML, or holds unknown keys or bad values.
    """
    _, cfg = _parse(path, overrides)
    cfg.model = cfg.model.init_args
    return cfg


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:600]


def _valid_keys(section: str | None, parser: Any, raw: Any) -> list[str]:
    if section == "model":
        return [*inspect.signature(VAESegmentationTask.__init__).parameters][1:]
    if section == "trainer":
        return [*inspect.signature(pl.Trainer.__init__).parameters][1:]
    if section == "data":
        data = raw.get("data") if isinstance(raw, dict) else None
        cp = data.get("class_path", _DATA) if isinstance(data, dict) else _DATA
        try:
            return [*inspect.signature(_class(cp)).parameters]
        except (ImportError, AttributeError, ValueError):
            return []
    # a jsonargparse Namespace iterates over its values; keys() gives the dotted option names
    return sorted({k.split(".")[0] for k in parser.get_defaults().keys()} - {"config"})  # noqa: SIM118


def _explain(msg: str, parser: Any, raw: Any) -> str:
    """One line naming the offending key, and the closest valid key when there is one."""
    section = class_path = None
    # A class_path section (model, data) nests its error inside a Union error.
    m = re.search(
        r"Parser key \"(\w+)\": Does not validate against any of the Union subtypes.*?Errors: - (.*?)"
        r" - Expected a <class 'NoneType'>",
        msg,
    )
    if m:
        section, msg = m.group(1), m.group(2)
    m = re.match(r"Problem with given class_path '([\w.]+)': (.*)", msg)
    if m:
        class_path, msg = m.group(1), m.group(2)
    prefix = f"{section}." if section else ""
    key = None
    m = re.search(r"Group '(\w+)' does not accept option '([\w.]+)'", msg)
    if m:
        section, key = m.group(1), m.group(2)
    else:
        m = re.search(r"Option '([\w.]+)' is not accepted", msg) or re.search(
            r"unrecognized arguments: --([\w.]+)", msg
        )
        if m:
            parts = m.group(1).split(".")
            section = section or (parts[0] if len(parts) > 1 else None)
            key = parts[-1]
    if key is not None:
        full = f"{section}.{key}" if section else key
        valid = _valid_keys(section, parser, raw)
        close = difflib.get_close_matches(key, valid, n=1)
        hint = (
            f"did you mean {section + '.' if section else ''}{close[0]}?"
            if close
            else f"valid keys{' of ' + section if section else ''}: {', '.join(valid)}"
        )
        return f"unknown key {full}; {hint}"
    m = re.search(r"Parser key \"([\w.]+)\":.*?Expected a <class '(\w+)'>.*?(?:Got|Given) value: (.+?)(?: - |$)", msg)
    if m:
        return f"{prefix}{m.group(1)}: expected {m.group(2)}, got {m.group(3).strip()!r}"
    # an option typed with a fixed set of values (geovae.choices)
    m = re.search(r"Parser key \"([\w.]+)\": Expected a typing\.Literal\[(.*?)\]\. Got value: (.+?)(?: - |$)", msg)
    if m:
        allowed = ", ".join(v.strip().strip("'\"") for v in m.group(2).split(","))
        return f"{prefix}{m.group(1)} {m.group(3).strip()!r}: use one of {allowed}"
    m = re.search(r"the following arguments are required: ([\w., ]+)", msg)
    if m:
        return f"{prefix}{m.group(1).strip()} is required; add it to the config"
    m = re.search(r"Import path ([\w.]+) does not correspond to a subclass of (\w+)", msg)
    if m:
        return f"{prefix}class_path {m.group(1)!r} is not a {m.group(2)}; check the class path"
    if class_path is not None:
        return f"{prefix}class_path {class_path!r} cannot be used ({msg}); check the class path"
    return msg


def train_from_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainResult:
    """Train from a LightningCLI-style YAML config (``geovae train --config X.yaml``).

    The config has ``model`` (arguments of :class:`~geovae.training.VAESegmentationTask`),
    ``data`` (either the arguments of :class:`~geovae.training.SceneDataModule` directly, or
    ``class_path`` + ``init_args`` of any Lightning/TorchGeo data module), ``trainer``
    (arguments of :class:`lightning.pytorch.Trainer`), and top-level ``seed_everything``,
    ``out``, ``tile_size``, ``kl_warmup_epochs`` and ``class_weighting``. Relative data paths
    are read from the working directory, else from the config file's folder. With geovae's
    data module the band count, classes and band statistics come from the data; with another
    data module, ``model.in_channels`` and ``model.num_classes`` must be given and the
    module's own ``mean``/``std`` (TorchGeo's convention) are folded into the model file's
    normalisation.

    Args:
        path: the YAML file.
        overrides: ``"section.key=value"`` strings (``geovae train --set``).

    Returns:
        A :class:`~geovae.training.TrainResult`.

    Raises:
        ConfigError: unknown keys or bad values.
        ModelMismatchError: the config's ``model.in_channels`` differs from the image's bands.
        GeovaeError: any other bad input, as :func:`~geovae.training.train_model` raises it.
    """
    from lightning.pytorch.cli import instantiate_class

    parser, cfg = _parse(path, overrides)
    p = str(path)
    out_path = _check_out(cfg.out)
    # Trainer callbacks, loggers and plugins given by class_path become objects here.
    trainer_args = {
        k: v for k, v in vars(parser.instantiate(cfg).trainer).items() if v is not None and not k.startswith("__")
    }
    for key in ("max_epochs", "max_steps"):
        if trainer_args.get(key) == 0:
            raise ConfigError(f"config {p}: trainer.{key} 0 trains nothing; give 1 or more (no model was written)")
    accel = str(trainer_args.get("accelerator", "auto"))
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise OptionError(f"config {p}: trainer.accelerator {accel}: no CUDA device is available; use auto or cpu")
    use_cuda = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    if "precision" not in trainer_args:
        trainer_args["precision"] = (
            ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if use_cuda else "32-true"
        )
    model_args = {k: v for k, v in cfg.model.init_args.as_dict().items() if not k.startswith("__")}
    check_hyperparameters(model_args, prefix=f"config {p}: model.")
    check_hyperparameters({"kl_warmup_epochs": cfg.kl_warmup_epochs}, prefix=f"config {p}: ")
    seed = int(cfg.seed_everything)
    pl.seed_everything(seed, workers=True, verbose=False)
    data = {"class_path": cfg.data.class_path, "init_args": cfg.data.init_args.as_dict()}
    data["init_args"] = {k: v for k, v in data["init_args"].items() if not k.startswith("__")}
    ia = data["init_args"]
    check_not_inputs(
        [out_path],
        [
            p,
            *(ia.get(k) for k in (*_PATH_KEYS, "background") if isinstance(ia.get(k), str)),
            *(ia.get("unlabeled") or []),
        ],
        fix="choose another out",
    )
    provenance: dict[str, Any] = {"seed": seed, "config": os.path.abspath(p)}
    input_mean = input_std = None
    if issubclass(_class(data["class_path"]), SceneDataModule):
        if cfg.class_weighting is not None and cfg.class_weighting not in CLASS_WEIGHTINGS:
            raise ConfigError(f"config {p}: class_weighting {cfg.class_weighting!r}: use inverse-sqrt or null")
        dm = instantiate_class((), data)
        task_args = scene_task_arguments(
            dm, model_args, class_weighting=cfg.class_weighting, kl_warmup_epochs=cfg.kl_warmup_epochs
        )
        tile = cfg.tile_size or dm.tile
    else:
        for k in ("in_channels", "num_classes"):
            if model_args.get(k) is None:
                raise ConfigError(f"config {p}: model.{k} is required with data module {data['class_path']}")
        if cfg.kl_warmup_epochs is not None:
            raise ConfigError(f"config {p}: kl_warmup_epochs needs geovae's SceneDataModule; set model.kl_warmup_steps")
        try:
            dm = instantiate_class((), data)
        except GeovaeError:
            raise
        except Exception as e:
            raise ConfigError(f"config {p}: data module {data['class_path']} failed: {_first_line(e)}") from None
        ps = data["init_args"].get("patch_size", 256)
        tile = cfg.tile_size or (ps if isinstance(ps, int) else int(ps[0]))
        task_args = model_args
        provenance["data"] = {
            "datamodule": data["class_path"],
            "init_args": {k: str(v) for k, v in data["init_args"].items()},
        }
        # TorchGeo data modules normalise batches with their own mean/std before the task.
        if hasattr(dm, "mean") and hasattr(dm, "std"):
            input_mean = torch.as_tensor(dm.mean, dtype=torch.float64).flatten().tolist()
            input_std = torch.as_tensor(dm.std, dtype=torch.float64).flatten().tolist()
    return fit_and_save(
        dm,
        task_args,
        out_path,
        trainer_kwargs=trainer_args,
        tile_size=int(tile),
        provenance=provenance,
        input_mean=input_mean,
        input_std=input_std,
    )
