"""Exceptions a user can see.

Every error raised for bad input is a :class:`GeovaeError` whose message is one line that
says what is wrong and what to do. The CLI prints that line and exits with
:attr:`GeovaeError.exit_code`; it never shows a traceback for these (``--debug`` does).
Anything else that escapes is a bug in geovae, not a user error.
"""

from __future__ import annotations


class GeovaeError(Exception):
    """Base of every user-facing error.

    Attributes:
        exit_code: process exit status the CLI uses (1 runtime error, 2 usage error).
    """

    exit_code: int = 1


class SceneError(GeovaeError):
    """The input raster is missing, unreadable, not a raster, or unusable as a scene."""


class CorruptSceneError(SceneError):
    """Part of an otherwise readable raster cannot be decoded (a corrupt tile)."""


class ModelFileError(GeovaeError):
    """A model file is missing, corrupt, foreign, unsafe or from an unknown format version."""


class ModelMismatchError(GeovaeError):
    """The model and the scene do not fit (band count, tile size...)."""


class LabelsError(GeovaeError):
    """Labels are unusable: other grid, unknown class ids, no labelled pixels."""


class ConfigError(GeovaeError):
    """A training configuration file is invalid (unknown keys, wrong types)."""

    exit_code = 2


class OptionError(GeovaeError):
    """An option value is out of range or inconsistent with the others."""

    exit_code = 2


class OutputError(GeovaeError):
    """The output location cannot be written."""


class DataError(GeovaeError):
    """Built-in or user-supplied demo data is missing or does not match."""


class ClusterError(GeovaeError):
    """A Dask scheduler cannot be reached or a cluster cannot be started."""
