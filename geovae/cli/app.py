"""The ``geovae`` click group and what every command shares: logging and its levels
(``-v``/``-q``/``--debug`` before or after the command), native libraries' printing, Lightning's
console handler."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from geovae._version import __version__


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


def quiet_native() -> None:
    """GDAL's and libtiff's own printing to stderr off (below -vv), for the commands that
    write: their errors reach geovae as exceptions, which become one line
    (:func:`geovae.native.quiet_native_output`)."""
    if STATE.verbosity < 2:
        from geovae.native import quiet_native_output

        quiet_native_output()


def quiet_lightning() -> None:
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


def verbosity_params() -> list[click.Option]:
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


def is_quiet(ctx: click.Context) -> bool:
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
