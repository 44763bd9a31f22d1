"""Ctrl-C and SIGTERM as a stop request that a run's loops check.

The ``geovae`` command installs :func:`installed`: SIGINT and SIGTERM then only record
themselves in a flag, and the loops of a run (tile batches, output blocks, COG copies,
training steps, generated images, the scenes of a batch, the viewer's server) call
:func:`check` at each step, which raises :class:`KeyboardInterrupt` (SIGINT) or
:class:`Terminated` (SIGTERM) from ordinary code. Every writer then cleans up on the way
out as it does for any exception, and the CLI exits 130 or 143.

Nothing is raised inside a handler, so a signal never interrupts an import (a handler's
exception there can leave the interpreter's import lock held and hang every thread that
imports after it), the release of a lock, a ``finally`` block, or the commit of an output
set; nor can its exception be lost in a callback whose errors Python only prints. A signal
that arrives while no loop checks (a long GDAL call) takes effect at the next check, and the
CLI checks once more before it exits.

A second Ctrl-C while the first is still pending stops the process at once, as a kill
would (its staging folders are removed by the next run into the same folder, and an
interrupted commit is finished by it from its journal); it is held back while an output set
is being committed.

Library callers keep their own handlers: :func:`check` only raises for a request recorded
by :func:`installed`'s handlers, and :func:`deferred` holds SIGINT and SIGTERM back (in the
main thread) for the few milliseconds of a commit, whatever the handlers are.

A process whose runs go on in threads (a worker of ``geovae batch``'s local Dask cluster)
installs :func:`worker_process`: Ctrl-C, which a terminal sends to every process of the
batch, is left to the batch (it stops the cluster), and SIGTERM (what the cluster sends a
worker that does not stop in time) and the process's exit wait for the commits in progress
in any thread, so a stopped batch never leaves a scene's files without their report.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Terminated", "check", "deferred", "installed", "requested", "worker_process"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM (what schedulers and ``kill`` send): unwinds like Ctrl-C, exit status 143."""


class _State:
    signum: int | None = None  # the first stop request, until the run ends
    active: bool = False  # installed()'s handlers are in place
    deferring: int = 0  # depth of deferred() blocks in the main thread


_STATE = _State()

#: Commits in progress in any thread (deferred() blocks): a worker process's SIGTERM and exit
#: wait for them to end (:func:`worker_process`).
_COMMITS = threading.Condition()
_committing = [0]
#: Seconds a stopped worker process waits for a commit in progress: renames take
#: milliseconds; a network filesystem may take longer, a hung one never ends.
_COMMIT_WAIT_S = 60.0


def _record(signum: int, frame: FrameType | None) -> None:
    if (
        signum == signal.SIGINT
        and _STATE.signum == signal.SIGINT
        and not _STATE.deferring
        and threading.current_thread() is threading.main_thread()
    ):
        # Ctrl-C pressed again before a loop stopped: stop now, as the default action does.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(signal.SIGINT)
        return
    if _STATE.signum is None:
        _STATE.signum = signum


def requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _STATE.signum


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def check() -> None:
    """Raise the pending stop request, if any: :class:`KeyboardInterrupt` for SIGINT,
    :class:`Terminated` for SIGTERM. Cheap: call it once per step of a loop.

    Only in the main thread, where Python runs signal handlers and where the run's cleanup
    stops its helper threads; elsewhere (a polygon worker, a Dask thread) it does nothing.
    The request stays recorded (a loop further out, or the CLI, sees it too).
    """
    signum = _STATE.signum
    if signum is not None and not _STATE.deferring and threading.current_thread() is threading.main_thread():
        raise _exception(signum)


@contextlib.contextmanager
def installed(*, exiting: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM record a stop request instead of raising, for the block.

    Outside the main thread (an application embedding the CLI) nothing changes. The
    previous handlers and a clear flag are restored on exit.

    Args:
        exiting: the process ends after the block (the ``geovae`` command): SIGINT and SIGTERM
            are then ignored instead of restored. The interpreter's exit (a second or more
            with torch and GDAL loaded) resets Python's handlers to the fatal default, so a
            signal then would kill a process whose work is done and whose exit status is
            decided.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    _STATE.signum, _STATE.active = None, True
    try:
        for s in _SIGNALS:
            signal.signal(s, _record)
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if exiting else h if h is not None else signal.SIG_DFL)
        _STATE.signum, _STATE.active = None, False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block: it cannot be cut by a signal.

    Under :func:`installed` the handlers never raise, so this only keeps :func:`check` and
    a second Ctrl-C quiet until the block ends. Otherwise (a library caller with Python's
    default KeyboardInterrupt, or its own handlers) the handlers are replaced for the block
    by one that records the signal, and a recorded signal is delivered again to the
    restored handler when the block ends, so it takes effect right after the block. Only
    the main thread can change handlers; elsewhere the block runs as is (a handler raises
    in the main thread, never in this one).
    """
    if threading.current_thread() is not threading.main_thread():
        with _commit():
            yield
        return
    # The count drops before a held signal is delivered again: its handler may wait for it.
    with _held_here(), _commit():
        yield


@contextlib.contextmanager
def _commit() -> Iterator[None]:
    with _COMMITS:
        _committing[0] += 1
    try:
        yield
    finally:
        with _COMMITS:
            _committing[0] -= 1
            _COMMITS.notify_all()


@contextlib.contextmanager
def _held_here() -> Iterator[None]:
    """deferred() in the main thread."""
    _STATE.deferring += 1
    if _STATE.active:
        try:
            yield
        finally:
            _STATE.deferring -= 1
        return
    got: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    previous = {}
    try:
        for s in _SIGNALS:
            previous[s] = signal.signal(s, hold)
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _STATE.deferring -= 1
        for signum in dict.fromkeys(got):
            signal.raise_signal(signum)


def _wait_for_commits() -> None:
    """Under the lock: until no commit is in progress (or the wait gives up)."""
    _COMMITS.wait_for(lambda: _committing[0] == 0, timeout=_COMMIT_WAIT_S)


def _end_after_commits(signum: int, frame: FrameType | None) -> None:
    # The lock is kept to the end: no commit can start between the wait and the exit.
    with _COMMITS:
        _wait_for_commits()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def _exit_after_commits() -> None:
    # The lock stays taken: a thread about to start a commit waits, moving nothing, until
    # the interpreter stops it.
    _COMMITS.acquire()
    _wait_for_commits()


def worker_process() -> None:
    """Signals for a process whose runs go on in other threads (a Dask worker process).

    SIGINT is ignored: a Ctrl-C in a terminal reaches every process of its group, and the
    process that started this one decides what a stop means (``geovae batch`` cancels its
    scenes and closes the cluster). SIGTERM ends the process as its default action does,
    but only once the output sets being committed in any thread are in place; the
    process's exit waits for them too (it would otherwise cut the threads at any
    instruction). Call it in the main thread; elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_after_commits)
    atexit.register(_exit_after_commits)
