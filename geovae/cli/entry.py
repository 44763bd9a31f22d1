"""The console script: the command line run, its exit code, every error as one line."""

from __future__ import annotations

import signal

import click

from geovae import signals
from geovae.cli import demo, evaluate, model, scenes, segment, vectorize  # noqa: F401  (each registers its commands)
from geovae.cli.app import STATE, cli, verbosity_params
from geovae.errors import GeovaeError

for _cmd in cli.commands.values():
    _cmd.params.extend(verbosity_params())


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
