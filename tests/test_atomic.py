"""Outputs appear whole under their final name, with ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from geovae.atomic import atomic_path, write_text


def test_atomic_path_renames_on_success_and_cleans_up_on_failure(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_text() == "{}"
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_output_checks_say_what_is_wrong_and_create_nothing(tmp_path: Path) -> None:
    from geovae.atomic import check_output_dir, check_output_file
    from geovae.errors import OutputError

    assert check_output_file(tmp_path / "a.gpkg") == tmp_path / "a.gpkg"
    assert not (tmp_path / "a.gpkg").exists()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path)
    with pytest.raises(OutputError, match=r"is a folder; give a file name such as .*model\.safetensors"):
        check_output_file(tmp_path, example="model.safetensors")
    with pytest.raises(OutputError, match="does not exist; create it first"):
        check_output_file(tmp_path / "missing" / "a.gpkg")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f")
    assert check_output_dir(tmp_path / "new" / "deep").is_dir()
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the write probe is gone
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="not writable"):
            check_output_file(ro / "a.gpkg")


def _signal_at_rename(monkeypatch: pytest.MonkeyPatch, signum: int, at: int) -> list[str]:
    """Make the ``at``-th rename of a commit send ``signum`` to this process first."""
    import signal

    import geovae.atomic

    real = os.replace
    renamed: list[str] = []

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renamed.append(Path(dst).name)
        if len(renamed) == at:
            signal.raise_signal(signum)
        real(src, dst)

    monkeypatch.setattr(geovae.atomic, "_rename", rename)
    return renamed


def _stage(folder: Path, text: str) -> object:
    from geovae.atomic import OutputSet

    s = OutputSet(folder, "s")
    s.open()
    for n in ("s.a", "s.b", "s.c", "s.json"):
        s.path(n).write_text(text)
    return s


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("at", [1, 2, 4])
def test_a_signal_during_a_commit_takes_effect_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signame: str, at: int
) -> None:
    """A stop request that arrives between two renames of a commit (it used to leave the
    files without their report: the old report is removed first) takes effect once the
    report is in place: under the CLI's flag handlers and under Python's own."""
    import signal

    from geovae import signals

    signum = getattr(signal, signame)
    for installed in (True, False):
        folder = tmp_path / f"{installed}"
        old = _stage(folder, "old")
        old.commit(["s.a", "s.b", "s.c"], last="s.json")  # type: ignore[attr-defined]
        old.close()  # type: ignore[attr-defined]
        renamed = _signal_at_rename(monkeypatch, signum, at)
        new = _stage(folder, "new")
        expected = KeyboardInterrupt if signum == signal.SIGINT else signals.Terminated
        with signals.installed() if installed else _python_handlers(signum), pytest.raises(expected):
            new.commit(["s.a", "s.b", "s.c"], last="s.json")  # type: ignore[attr-defined]
        new.close()  # type: ignore[attr-defined]
        assert renamed == ["s.a", "s.b", "s.c", "s.json"]  # the commit ran to its end
        assert {p.name: p.read_text() for p in folder.iterdir()} == dict.fromkeys(
            ("s.a", "s.b", "s.c", "s.json"), "new"
        ), installed


def _python_handlers(signum: int) -> object:
    """A library caller's handlers: Python's KeyboardInterrupt for SIGINT, a raising one for SIGTERM."""
    import contextlib
    import signal

    from geovae import signals

    @contextlib.contextmanager
    def cm() -> object:
        def raise_terminated(s: int, f: object) -> None:
            raise signals.Terminated()

        # Set, not assumed: a process started in the background by a shell without job
        # control (nohup ... &, some CI runners) starts with SIGINT ignored, and Python then
        # leaves it so.
        prev_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        prev = signal.signal(signal.SIGTERM, raise_terminated)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, prev)
            signal.signal(signal.SIGINT, prev_int)

    return cm()


def test_a_signal_before_a_commit_moves_nothing(tmp_path: Path) -> None:
    """Under the CLI a stop request is a flag: a run that reaches its commit with one pending
    commits nothing (the folder keeps the previous set)."""
    import signal

    from geovae import signals

    s = _stage(tmp_path, "new")
    with signals.installed():
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested() == signal.SIGTERM
        with pytest.raises(signals.Terminated):
            s.commit(["s.a", "s.b", "s.c"], last="s.json")  # type: ignore[attr-defined]
    s.close()  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == []
    assert signals.requested() is None  # cleared with the handlers


def test_a_second_ctrl_c_stops_at_once_except_during_a_commit() -> None:
    """The first Ctrl-C is a request the loops see; a second one before they stop kills the
    process as Ctrl-C's default action does, unless an output set is being committed."""
    import signal
    import subprocess
    import sys

    code = (
        "import signal\nfrom geovae import signals\n"
        "with signals.installed():\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    print('flagged', flush=True)\n"
        "    with signals.deferred():\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "        print('held', flush=True)\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    print('not reached', flush=True)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGINT and p.stdout == "flagged\nheld\n", (p.returncode, p.stdout, p.stderr)


_WORKER = """
import os, signal, sys, threading, time
from pathlib import Path

import geovae.atomic
from geovae import signals

folder, stop, guard = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
if guard:
    signals.worker_process()
old = geovae.atomic.OutputSet(folder, "s")
old.open()
for n in ("s.a", "s.b", "s.c", "s.json"):
    old.path(n).write_text("old")
old.commit(["s.a", "s.b", "s.c"], last="s.json")
old.close()
real = os.replace
renaming = threading.Event()

def rename(src, dst):
    renaming.set()
    time.sleep(0.1)
    real(src, dst)

geovae.atomic._rename = rename
new = geovae.atomic.OutputSet(folder, "s")
new.open()
for n in ("s.a", "s.b", "s.c", "s.json"):
    new.path(n).write_text("new")
# A Dask worker's task thread: daemon, and the process may end while it commits.
threading.Thread(target=new.commit, args=(["s.a", "s.b", "s.c"],), kwargs={"last": "s.json"}, daemon=True).start()
renaming.wait()
if stop == "signals":
    os.kill(os.getpid(), signal.SIGINT)  # a terminal's Ctrl-C reaches the workers too
    os.kill(os.getpid(), signal.SIGTERM)  # what the cluster sends a worker that does not stop
    time.sleep(30)
"""


@pytest.mark.parametrize("stop", ["signals", "exit"])
def test_a_worker_process_is_not_stopped_halfway_through_a_commit(tmp_path: Path, stop: str) -> None:
    """A batch's scenes commit in a worker process's threads, where signals cannot be held
    back: Ctrl-C, SIGTERM or the process's exit cut the commit after the old report was gone.
    Under signals.worker_process Ctrl-C is ignored, and SIGTERM and the exit wait for the
    commit: the folder holds the whole new set with its report."""
    import signal
    import subprocess
    import sys

    def files(folder: Path) -> dict[str, str]:
        return {p.name: p.read_text() for p in folder.iterdir() if not p.name.startswith(".")}

    full = dict.fromkeys(("s.a", "s.b", "s.c", "s.json"), "new")
    for guard in (False, True):
        folder = tmp_path / f"{stop}-{guard}"
        p = subprocess.run(
            [sys.executable, "-c", _WORKER, str(folder), stop, "1" if guard else "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if not guard:  # the stop lands mid-commit: files without their report (the test can fail)
            assert files(folder) and "s.json" not in files(folder), (p.stderr, files(folder))
            continue
        code = -signal.SIGTERM if stop == "signals" else 0
        assert p.returncode == code and p.stderr == "", (p.returncode, p.stderr)
        assert files(folder) == full
