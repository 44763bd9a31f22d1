"""Keeping the memory a run frees from staying with the process.

glibc's malloc serves a large allocation with its own ``mmap`` (given back to the system when
freed) only above a threshold, and by default it raises that threshold to the size of every
such block freed, up to 32 MiB. A run allocates and frees blocks, tiles, activations and Arrow
batches of a few MiB over and over, from several threads (the reader, the model loop, the
polygon worker, the format writers, torch's), so once the threshold has risen they come from
the threads' heaps instead, where the freed ones stay resident between smaller live ones:
the memory malloc holds free grows with the number of blocks a run goes through, that is with
the scene's area. :func:`cap_mmap_threshold` fixes the threshold at
:data:`MMAP_THRESHOLD`, so an allocation that large which no free chunk of a heap can serve
is mapped, and unmapped when freed, instead of growing a heap. ``geovae segment`` and ``geovae
view`` (whose request threads read overview windows) fix it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["MMAP_THRESHOLD", "cap_mmap_threshold"]

#: Allocations from this size on get their own mapping (glibc's ``M_MMAP_THRESHOLD``): an
#: output block's band (1024² float32 is 4 MiB) and larger. Smaller ones stay on the heaps,
#: where reusing them costs no system call.
MMAP_THRESHOLD = 4 * 2**20
#: ``M_MMAP_THRESHOLD`` in glibc's ``malloc.h``.
_M_MMAP_THRESHOLD = -3


@functools.cache
def cap_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process (once).

    Process-wide and lasting, like GDAL's cache size: it changes only where large blocks
    come from, never what a program computes. Left alone where the user set the threshold
    (``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES``) and off glibc (macOS, musl).

    Returns:
        True when the threshold was set.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
