"""Native libraries' own printing to stderr, turned off where geovae reports their errors.

GDAL and libtiff report a failed write (a full disk...) to geovae as an exception, which the
CLI turns into one line; some of them also print straight to the process's stderr, around
that line: libtiff's ``_tiffWriteProc: No space left on device.`` (the messages GDAL's
per-file handlers do not receive go to libtiff's process-wide printer), GDAL's
``ERROR 1: sqlite3_exec(...) failed`` (pyogrio's GDAL uses GDAL's default printer).
:func:`quiet_native_output` turns both off for the process. Only the ``geovae`` command and
the workers of a local cluster it starts call it: a library caller keeps its process as it is.
"""

from __future__ import annotations

import ctypes
import glob
import os

__all__ = ["quiet_native_output"]


def quiet_native_output() -> None:
    """Send GDAL's default error printer to the null device (``CPL_LOG``, unless the user set
    it) and unset libtiff's process-wide error and warning printers in the libtiff rasterio
    loaded (when they are libtiff's own: a GDAL build that routes them is left alone)."""
    os.environ.setdefault("CPL_LOG", os.devnull)
    try:
        import rasterio
    except ImportError:  # pragma: no cover - a dependency
        return
    here = os.path.dirname(rasterio.__file__)
    libs = glob.glob(os.path.join(here + ".libs", "libtiff*.so*"))
    libs += glob.glob(os.path.join(here, ".dylibs", "libtiff*.dylib"))
    for lib in libs:
        try:
            tiff = ctypes.CDLL(lib)
            for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
                fn = getattr(tiff, name)
                fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
                previous = fn(None)
                if previous and library_of(previous) != os.path.realpath(lib):
                    fn(previous)  # a printer GDAL installed (older builds): keep it
        except (OSError, AttributeError):  # another build: leave it as it is
            continue


def library_of(address: int) -> str | None:
    """The file of the shared library a function address lies in (``dladdr``), or None."""

    class _DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):  # pragma: no cover - no dladdr
        return None
    dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)], ctypes.c_int
    info = _DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(info.dli_fname))
