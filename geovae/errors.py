"""Exceptions a user can see.

Every error raised for bad input is a :class:`GeovaeError` whose message is one line that
says what is wrong and what to do. The CLI prints that line and exits with
:attr:`GeovaeError.exit_code`; it never shows a traceback for these (``--debug`` does).
Anything else that escapes is a bug in geovae, not a user error.

Each error also inherits the built-in type a library caller would catch without knowing
geovae (as rasterio's ``RasterioIOError(RasterioError, OSError)`` does): a scene, model file
or output problem is an :class:`OSError`, a bad option, label or config a :class:`ValueError`,
an unreachable cluster or a failed download a :class:`ConnectionError`, an optional
dependency that is not installed an :class:`ImportError`.
"""

from __future__ import annotations


class GeovaeError(Exception):
    """Base of every user-facing error.

    Attributes:
        exit_code: process exit status the CLI uses (1 runtime error, 2 usage error).
    """

    exit_code: int = 1


class SceneError(GeovaeError, OSError):
    """The input raster is missing, unreadable, not a raster, or unusable as a scene."""


class CorruptSceneError(SceneError):
    """Part of an otherwise readable raster cannot be decoded (a corrupt tile)."""


class ModelFileError(GeovaeError, OSError):
    """A model file is missing, corrupt, foreign, unsafe or from an unknown format version."""


class ModelMismatchError(GeovaeError, ValueError):
    """The model and the scene do not fit (band count, tile size...)."""


class LabelsError(GeovaeError, ValueError):
    """Labels are unusable: other grid, unknown class ids, no labelled pixels."""


class ConfigError(GeovaeError, ValueError):
    """A training configuration file is invalid (unknown keys, wrong types)."""

    exit_code = 2


class OptionError(GeovaeError, ValueError):
    """An option value is out of range or inconsistent with the others."""

    exit_code = 2


class TrainingError(GeovaeError, RuntimeError):
    """A training run produced no usable model (its loss went non-finite, or it made no
    optimisation step); nothing is written."""


class OutputError(GeovaeError, OSError):
    """The output location cannot be written."""


class DataError(GeovaeError, OSError):
    """Built-in or user-supplied demo data is missing or does not match."""


class ClusterError(GeovaeError, ConnectionError):
    """A Dask scheduler cannot be reached or a cluster cannot be started."""


class AreaOutsideSceneError(SceneError):
    """The area to segment (``--bbox``/``--intersects``) holds none of a scene's pixels.

    A batch counts such a scene as skipped, not failed: a search over an area finds scenes
    whose tile touches the area while their data do not.
    """


class SourceError(GeovaeError, OSError):
    """A STAC API, a STAC Item or an item file cannot be read, or a search finds nothing."""


class DownloadError(GeovaeError, ConnectionError):
    """Pretrained weights could not be downloaded (offline, refused, or a failed hash check)."""


class MissingDependencyError(GeovaeError, ImportError):
    """An optional dependency a feature needs is not installed (the message names the extra)."""


def one_line(exc: BaseException, limit: int = 500) -> str:
    """``exc`` as one line for a message or a manifest row: a geovae error's own message,
    anything else as ``Type: message``; white space folded, cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or repr(exc)
    if not isinstance(exc, GeovaeError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
