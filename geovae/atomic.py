"""Files appear under their final names only when complete, and a set of them all at once.

Two mechanisms, and every writer in geovae uses one of them:

* :func:`atomic_path` for one file (a model file, a manifest, a marker): written under a
  unique hidden temporary name in the same folder, renamed when complete.
* :class:`OutputSet` for the files of one run (a scene's rasters, polygons, quicklook, STAC
  item and report): every file is written into a private staging folder
  ``OUT/.<stem>.geovae-run-<id>.part/`` under its final name, and :meth:`OutputSet.commit`
  moves the whole set into place at the end, the report last. A run that fails (an error,
  a full disk, Ctrl-C, SIGTERM) leaves the previous set untouched; a killed run leaves only
  its staging folder, which the next run into the same set removes. A run holds an
  advisory lock on its set (``.<stem>.geovae.lock``), so a second run into the same set is
  refused with one line instead of mixing files with the first.

The commit is a sequence of renames within one filesystem. Before the first one it writes a
journal into the staging folder. Ctrl-C and SIGTERM are held back from the journal to the
last rename (:func:`geovae.signals.deferred`) and take effect right after it, so a stopped
run leaves either the previous set or the whole new one with its report; a run killed in the
middle of its commit (``kill -9``, a power cut: a few milliseconds) is finished by the next
run into the set, which replays the journal under the lock. The previous report is removed
before anything moves, so no report ever vouches for a mixed set.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from geovae import signals
from geovae.errors import OptionError, OutputError

__all__ = [
    "OutputSet",
    "atomic_path",
    "check_name_lengths",
    "check_not_inputs",
    "check_output_dir",
    "check_output_file",
    "check_output_suffix",
    "clear_abandoned",
    "created_folder",
    "disk_full_error",
    "finish_commits",
    "is_disk_full",
    "pending_commits",
    "sha256",
    "write_text",
]

_JOURNAL = ".commit.json"
_RUN_TAG = "geovae-run-"
_LOCK_SUFFIX = ".geovae.lock"


#: The rename of a commit (a test replaces it to stop a run between two renames).
_rename = os.replace


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    The temporary name is unique (two writers of one file never share it). The file gets
    the permissions a plain ``open(path, "w")`` would give (``mkstemp`` alone would leave it
    readable by its owner only). On any exception the temporary file is removed and the
    exception propagates, as an :class:`~geovae.errors.OutputError` when the disk is full.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        full = is_disk_full(exc, path.parent)
        written = tmp.stat().st_size if tmp.exists() else None
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full_error(path.parent, written) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (outputs and downloads can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- checks made before any work --------------------------------------------------------


def check_output_file(path: str | os.PathLike[str], example: str | None = None) -> Path:
    """Check that a file can be written at ``path``: not a folder, its folder exists and is writable.

    Nothing is created: a single output file never makes folders the user did not ask for.

    Args:
        path: the output file.
        example: a file name to suggest when ``path`` is a folder (``model.safetensors``).

    Returns:
        Its path.

    Raises:
        OutputError: with one line saying what is wrong and what to do.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        hint = f" such as {p / example}" if example else " inside it"
        raise OutputError(f"output {p} is a folder; give a file name{hint}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist; create it first")
    check_name_lengths(parent, [p.name])
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable; choose another --out")
    return p


def check_output_dir(out_dir: str | Path, *, create: bool = True) -> Path:
    """Check that ``out_dir`` is (or can become) a writable folder.

    Args:
        out_dir: the folder.
        create: make it (and prove it can be written) now; with False nothing is created and
            the nearest existing ancestor must be writable (:class:`OutputSet` creates the
            folder only once every check of a run has passed).

    Returns:
        Its path.

    Raises:
        OutputError: if it is a file or cannot be created or written.
    """
    p = Path(out_dir).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"output {p} is a file, not a folder; pass a folder with --out")
    if not create:
        anc = p if p.exists() else next((a for a in p.absolute().parents if a.exists()), Path("/"))
        if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
            raise OutputError(f"output folder {p} cannot be written ({anc} is not writable); choose another --out")
        return p
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".geovae-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"output folder {p} cannot be written ({exc.strerror or exc}); choose another --out"
        ) from None
    return p


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet, deepest first."""
    absolute = folder.absolute()
    return [d for d in (absolute, *absolute.parents) if not d.exists()]


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def created_folder(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Create ``out_dir`` as :func:`check_output_dir` does, for a block that writes into it.

    A run that fails (an error, a full disk, Ctrl-C) must not leave behind a folder the user
    did not have before: on any exception the folders made here are removed, deepest first,
    while they are empty (what the run wrote stays, and keeps its folder).

    Yields:
        The folder's path.

    Raises:
        OutputError: if it is a file or cannot be created or written.
    """
    made = _missing_folders(Path(out_dir).expanduser())
    try:
        path = check_output_dir(Path(out_dir))
        yield path
    except BaseException:
        _remove_empty(made)
        raise


#: Bytes a name of geovae's may grow by on disk: a temporary copy (``.<name>.<8>.part``), a
#: scratch file (``.<name>.scratch``), GDAL's sidecars and temporary overviews
#: (``.aux.xml``, ``.ovr.tmp``), SQLite's journal (``-journal``).
NAME_MARGIN = 16


def _name_max(folder: Path) -> int:
    anc = folder if folder.exists() else next((a for a in folder.absolute().parents if a.exists()), Path("/"))
    try:
        return int(os.pathconf(anc, "PC_NAME_MAX"))
    except (OSError, ValueError):  # pragma: no cover - no pathconf
        return 255


def check_name_lengths(folder: str | os.PathLike[str], names: Iterable[str], *, margin: int = NAME_MARGIN) -> None:
    """Refuse, before anything is created, names too long for the filesystem of ``folder``.

    File names are limited in bytes (255 on most filesystems), and a UTF-8 name of
    non-Latin script takes 2-4 bytes a character. Each name is checked with ``margin``
    bytes to spare for the temporary and sidecar files made from it.

    Raises:
        OutputError: naming the longest name, its length and the limit.
    """
    folder = Path(folder)
    limit = _name_max(folder)
    longest = max(names, key=lambda n: len(os.fsencode(n)), default="")
    n = len(os.fsencode(longest))
    if n + margin > limit:
        short = longest if len(longest) <= 60 else f"{longest[:40]}...{longest[-12:]}"
        raise OutputError(
            f"output name {short} is too long: {n} bytes, and file names in {folder} may have at most "
            f"{limit - margin} here ({limit} with room for temporary files); give the input a shorter name "
            "(or a link to it)"
        )


def check_output_suffix(path: str | os.PathLike[str], suffixes: Sequence[str], *, writes: str, fix: str = "") -> None:
    """Refuse an output file whose name says another format than the one written.

    A model or raster written under a ``.png`` or ``.onnx`` name is opened with the wrong
    reader (or by the wrong program) later; the name is refused instead of guessed at.

    Args:
        path: the output file.
        suffixes: the suffixes of the format written, lower case with the dot, the preferred first.
        writes: what is written, for the message (``"train writes a safetensors model file"``).
        fix: more advice ending the message (``"add --onnx to write ONNX"``).

    Raises:
        OptionError: naming the output and the name to give instead.
    """
    p = Path(path)
    if p.suffix.lower() in suffixes:
        return
    stem = p.stem if p.suffix else p.name
    extra = f"; {fix}" if fix else ""
    raise OptionError(f"--out {path}: {writes}; name the file {stem}{suffixes[0]}{extra}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_inputs(
    outputs: Iterable[str | os.PathLike[str]],
    inputs: Iterable[str | os.PathLike[str] | None],
    *,
    fix: str = "choose another --out folder",
) -> None:
    """Refuse a run whose outputs would replace one of its inputs.

    An output that is an existing file is compared with every local input by inode
    (``os.path.samefile``), so a hard link or a symbolic link to an input is caught as well
    as the same path spelled another way.

    Args:
        outputs: the files the run would write.
        inputs: the files it reads (``None``, URLs and GDAL virtual paths are skipped).
        fix: what the user should do, ending the message.

    Raises:
        OutputError: naming the output and the input, and what to do.
    """
    ins = [Path(i) for i in inputs if i is not None and "://" not in str(i) and not str(i).startswith("/vsi")]
    ins = [i for i in ins if i.exists()]
    for o in outputs:
        o = Path(o)
        if not o.exists():
            continue
        for i in ins:
            if _same_file(o, i):
                what = "is" if o.absolute() == i.absolute() else "is the same file as"
                raise OutputError(f"output {o} {what} the input {i}; writing it would destroy the input; {fix}")


# -- disk full ----------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def is_disk_full(exc: BaseException, folder: str | os.PathLike[str], needed: int = 0) -> bool:
    """Whether ``exc`` happened because the disk of ``folder`` is full.

    GDAL reports a full disk as a generic write failure ("Write failed", a TIFF error), so
    besides ``ENOSPC``/``EDQUOT`` or a message saying so anywhere in the exception's chain,
    an I/O error (an ``OSError``, a GDAL or pyogrio error) on a filesystem with (almost) no
    space left counts as a full disk: less than 1 MiB, or less than ``needed``, the bytes the
    failed step was writing (GDAL removes its own partial file before it reports the error).
    Call it before removing what the failed writer wrote.
    """
    if isinstance(exc, OutputError):
        return False
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in chain):
        return True
    if any(any(s in str(x).lower() for s in _FULL_MESSAGES) for x in chain):
        return True
    if not any(_is_io_error(x) for x in chain):
        return False
    free = _free(folder)
    return free is not None and free < max(2**20, needed)


#: What writers say when the disk is full (SQLite, through GDAL's GeoPackage driver, says
#: "database or disk is full").
_FULL_MESSAGES = ("no space left", "disk space", "disk is full", "disk full")


def _is_io_error(exc: BaseException) -> bool:
    """An error a writer raises when a write fails: an ``OSError``, or one of GDAL's errors
    (rasterio's ``CPLE_*``: a full disk during a COG copy is "TIFFRewriteDirectory:Error
    fetching directory count") or pyogrio's, which do not say why."""
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("rasterio", "pyogrio", "fiona", "sqlite3")


def _free(folder: str | os.PathLike[str]) -> int | None:
    folder = Path(folder)
    probe = folder if folder.exists() else next((a for a in folder.absolute().parents if a.exists()), Path("/"))
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def disk_full_error(folder: str | os.PathLike[str], written: int | None = None) -> OutputError:
    """The one-line error for a run that filled the disk of ``folder``.

    Args:
        folder: where the run was writing.
        written: bytes the run had written when the disk filled.
    """
    free = _free(folder)
    had = (
        f"the run had written {_mb(written)} when the disk filled"
        if written and written >= 2**16
        else "the disk filled"
    )
    left = f", {_mb(free)} free now that its temporary files are gone" if free is not None else ""
    return OutputError(
        f"no space left on the device of {folder}: {had}{left}; free some space or choose "
        "another --out; nothing was written under a final name"
    )


# -- a set of outputs ---------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class OutputSet:
    """The files of one run, staged privately and moved into ``folder`` together.

    Use as a context manager: on entry the folder is created, the set's lock taken and the
    staging folder made; writers write to :meth:`path`; :meth:`commit` moves everything into
    place; leaving the block with an exception (or without a commit) removes the staging
    folder, so nothing appears under a final name. A full disk becomes one
    :class:`OutputError` line.

    Args:
        folder: where the files go.
        stem: the set's name (the scene stem): it names the lock and the staging folder.
        lock: hold ``.<stem>.geovae.lock`` while the set is open, refusing a second run.
        inputs: the run's input files; no output may replace one (:func:`check_not_inputs`).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        stem: str,
        *,
        lock: bool = True,
        inputs: Sequence[str | os.PathLike[str] | None] = (),
    ):
        self.folder = Path(folder).expanduser()
        self.stem = stem
        self.lock = lock
        self.inputs = list(inputs)
        self.run_id = uuid.uuid4().hex[:12]
        self.staging = self.folder / f".{stem}.{_RUN_TAG}{self.run_id}.part"
        self._lock_fd: int | None = None
        self._made: list[Path] = []
        self._open = False
        self.committed: dict[str, Path] = {}

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> OutputSet:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        full = exc is not None and is_disk_full(exc, self.folder)
        written = self.staged_bytes() if full else None
        self.close()
        if full:
            raise disk_full_error(self.folder, written) from None

    def open(self) -> None:
        """Create the folder, take the lock, finish or clear what killed runs left, stage."""
        check_output_dir(self.folder, create=False)
        check_name_lengths(self.folder, [self.staging.name, self.lock_path.name], margin=0)
        self._made = _missing_folders(self.folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._remove_made()
            raise OutputError(
                f"output folder {self.folder} cannot be created ({exc.strerror or exc}); choose another --out"
            ) from None
        try:
            if self.lock:
                self._take_lock()
            if self.lock:
                self._recover()
            self.staging.mkdir()
        except BaseException as exc:
            self._release_lock()
            self._remove_made()
            if is_disk_full(exc, self.folder):
                raise disk_full_error(self.folder) from None
            raise
        self._open = True

    def close(self) -> None:
        """Remove the staging folder (whatever was not committed) and release the lock; a
        run that committed nothing also removes the folders it created (when empty)."""
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self._open = False
        self._release_lock()
        if not self.committed:
            self._remove_made()

    def _remove_made(self) -> None:
        """Remove the folders :meth:`open` created, deepest first, while they are empty."""
        _remove_empty(self._made)
        self._made = []

    # -- writing ----------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Where to write the file that will be ``folder/name``."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"output name {name!r} must be a plain file name")
        return self.staging / name

    def scratch(self, name: str) -> Path:
        """A private working file of the run for ``name`` (a raster streamed before its COG
        copy): in the staging folder under a hidden name, never committed, removed with the
        staging folder."""
        return self.path(name).with_name(f".{name}.scratch")

    def final(self, name: str) -> Path:
        """The final path of ``name``."""
        return self.folder / name

    def staged_bytes(self) -> int:
        """Bytes written into the staging folder so far."""
        if not self.staging.exists():
            return 0
        return sum(p.stat().st_size for p in self.staging.iterdir() if p.is_file())

    def commit(self, names: Sequence[str], *, last: str | None = None, remove: Iterable[str] = ()) -> dict[str, Path]:
        """Move the staged files into place: ``names`` in order, then ``last`` (the report).

        GDAL sidecars of a staged file (``.aux.xml``, ``.ovr``, ``.msk``) go with it.

        Args:
            names: the staged files, in the order they should appear.
            last: the file that vouches for the set; moved after every other one.
            remove: files of an earlier set in ``folder`` that this set does not replace
                (an uncertainty raster a rerun without samples does not write): removed
                before ``last`` appears, unless one is an input.

        Returns:
            Final paths by name (sidecars included).

        Raises:
            KeyboardInterrupt, geovae.signals.Terminated: a stop request (Ctrl-C, SIGTERM) that
                came before the commit (nothing moves) or during it (raised once every file,
                report last, is in place: signals are held back while files move).
        """
        signals.check()
        order = list(names)
        for n in list(order):
            for side in (".aux.xml", ".ovr", ".msk"):
                if (self.staging / (n + side)).exists() and n + side not in order:
                    order.append(n + side)
        if last is not None:
            order.append(last)
        missing = [n for n in order if not (self.staging / n).exists()]
        if missing:
            raise FileNotFoundError(f"not staged: {missing}")
        finals = [self.folder / n for n in order]
        check_not_inputs(finals, self.inputs)
        stale = [n for n in dict.fromkeys(remove) if n not in order]
        stale = [n for n in stale if not any(_same_file(self.folder / n, Path(i)) for i in self.inputs if i)]
        journal = {"moves": order, "remove": stale, "last": last}
        # From the journal to the last rename no signal may cut in: the previous report is
        # gone before anything moves, so a stop halfway would leave files without a report.
        with signals.deferred():
            with open(self.staging / _JOURNAL, "w") as f:
                json.dump(journal, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.staging)
            self._replay(self.staging, journal)
            self.committed = {n: self.folder / n for n in order}
        signals.check()
        return dict(self.committed)

    def _replay(self, staging: Path, journal: dict[str, Any]) -> None:
        last = journal.get("last")
        if last is not None:
            # No report may vouch for a set that is half old, half new.
            (self.folder / last).unlink(missing_ok=True)
        for n in journal["moves"]:
            if n == last:
                continue
            src = staging / n
            if src.exists():
                _rename(src, self.folder / n)
        for n in journal["remove"]:
            (self.folder / n).unlink(missing_ok=True)
        if last is not None and (staging / last).exists():
            _fsync_dir(self.folder)
            _rename(staging / last, self.folder / last)
        _fsync_dir(self.folder)
        shutil.rmtree(staging, ignore_errors=True)

    # -- the lock and what killed runs leave ---------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.folder / f".{self.stem}{_LOCK_SUFFIX}"

    def _take_lock(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise OutputError(
                    f"another geovae run is writing the outputs of {self.stem} in {self.folder}; "
                    "wait for it to finish or choose another --out"
                ) from None
            # The holder before us may have removed the file after we opened it: a lock on a
            # removed file protects nothing, so start again on the file that is there now.
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        # Remove the file while holding the lock: a run that opened it meanwhile sees the
        # inode change and retries on a fresh file (see _take_lock).
        try:
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self) -> None:
        """Under the lock: finish a commit a killed run started, remove abandoned staging."""
        # (escaped: a scene named "a[1].tif" is not a pattern)
        for d in sorted(self.folder.glob(f".{glob.escape(self.stem)}.{_RUN_TAG}*.part")):
            journal = d / _JOURNAL
            if journal.is_file():
                try:
                    doc = json.loads(journal.read_text())
                except (OSError, ValueError):
                    doc = None
                if isinstance(doc, dict) and "moves" in doc:
                    with signals.deferred():
                        self._replay(d, doc)
                    continue
            shutil.rmtree(d, ignore_errors=True)


def pending_commits(folder: str | os.PathLike[str]) -> list[str]:
    """The stems of the sets in ``folder`` whose commit a killed run left unfinished."""
    journals = Path(folder).glob(f".*.{_RUN_TAG}*.part/{_JOURNAL}")
    return sorted({_staging_stem(j.parent.name) for j in journals})


def _staging_stem(name: str) -> str:
    """The set's stem in the name of a staging folder, ``.<stem>.geovae-run-<id>.part``."""
    return name[1:].rsplit(f".{_RUN_TAG}", 1)[0]


def finish_commits(folder: str | os.PathLike[str]) -> list[str]:
    """Finish the commits that runs killed in the middle of one (``kill -9``) left in ``folder``.

    Such a run leaves its set without a report until the next run into the set replays its
    journal; this replays it now (``geovae view`` calls it, so a folder in that state shows
    the whole new set). A set whose lock another run holds is left to that run.

    Returns:
        The stems of the sets whose commit was finished.

    Raises:
        OSError: the folder cannot be written (the commit stays pending).
    """
    return _recover_sets(Path(folder), pending_commits(folder))


def clear_abandoned(folder: str | os.PathLike[str]) -> list[str]:
    """Put ``folder`` back in order after runs that were killed (a stopped batch's workers):
    finish the commits they left half done, remove their staging folders and lock files.

    Without this, what a killed run staged (up to a whole set of rasters) stays on the disk
    until the next run into the same set. A set whose lock another run holds is left to
    that run.

    Returns:
        The stems of the sets put in order.

    Raises:
        OSError: the folder cannot be written.
    """
    folder = Path(folder)
    staged = {_staging_stem(d.name) for d in folder.glob(f".*.{_RUN_TAG}*.part") if d.is_dir()}
    locks = {f.name[1:].removesuffix(_LOCK_SUFFIX) for f in folder.glob(f".*{_LOCK_SUFFIX}")}
    return _recover_sets(folder, sorted(staged | locks))


def _recover_sets(folder: Path, stems: Iterable[str]) -> list[str]:
    """Under each set's lock, :meth:`OutputSet._recover` it; the stems recovered (a set
    whose lock a live run holds is skipped: that run recovers it itself)."""
    done = []
    for stem in stems:
        s = OutputSet(folder, stem)
        try:
            s._take_lock()
        except OutputError:
            continue
        try:
            s._recover()
        finally:
            s._release_lock()
        done.append(stem)
    return done
