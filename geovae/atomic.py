"""Files appear under their final name only when complete.

Every output geovae writes goes to a hidden temporary name in the same folder (so the final
``os.replace`` is a rename on one filesystem) and is renamed when complete; a run that is
killed leaves at most a ``.<name>.*.part`` file, never a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from geovae.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    The file gets the permissions a plain ``open(path, "w")`` would give (``mkstemp`` alone
    would leave it readable by its owner only). On any exception the temporary file is removed
    and the exception propagates.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
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
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable; choose another --out")
    return p


def check_output_dir(out_dir: str | Path) -> Path:
    """Create the output folder if needed and prove it can be written.

    Args:
        out_dir: the folder.

    Returns:
        Its path.

    Raises:
        OutputError: if it is a file or cannot be created or written.
    """
    p = Path(out_dir).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"output {p} is a file, not a folder; pass a folder with --out")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".geovae-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"output folder {p} cannot be written ({exc.strerror or exc}); choose another --out") from None
    return p
