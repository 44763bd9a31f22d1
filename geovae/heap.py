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

Below the threshold, each thread that allocates while another holds its heap's lock gets a
heap of its own (up to 8 per core), and what a heap frees stays with it: chunks a thread
freed serve no other thread. A segment run's threads each hold tens of MiB free that way,
more as the run goes on, while the model's activations come and go beside them.
:func:`limit_heaps` lets the run's threads share :data:`MAX_HEAPS` heaps instead. The lock
they then share is held for the short time an allocation of less than 4 MiB takes; the
larger ones are mapped and take no heap lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

__all__ = ["MAX_HEAPS", "MMAP_THRESHOLD", "cap_mmap_threshold", "limit_heaps", "tune_heap"]

#: Allocations from this size on get their own mapping (glibc's ``M_MMAP_THRESHOLD``): an
#: output block's band (1024² float32 is 4 MiB) and larger. Smaller ones stay on the heaps,
#: where reusing them costs no system call.
MMAP_THRESHOLD = 4 * 2**20
#: Heaps (glibc's arenas) the threads of a run share: the main thread's and one more.
MAX_HEAPS = 2
#: ``M_MMAP_THRESHOLD`` and ``M_ARENA_MAX`` in glibc's ``malloc.h``.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _mallopt() -> Any:
    """glibc's ``mallopt``, or None off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def _set_unless_user_set(param: int, value: int, env: str, tunable: str) -> bool:
    """``mallopt(param, value)``, unless the user set it (``env``, or ``tunable`` in
    ``GLIBC_TUNABLES``) or this is not glibc; True when it was set."""
    if env in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(param, value))


def tune_heap() -> None:
    """What a segment run or the viewer sets up: :func:`cap_mmap_threshold` and
    :func:`limit_heaps`."""
    cap_mmap_threshold()
    limit_heaps()


@functools.cache
def limit_heaps() -> bool:
    """Let the threads created from now on share :data:`MAX_HEAPS` malloc heaps (once).

    Threads that already have a heap keep it. Process-wide and lasting, like
    :func:`cap_mmap_threshold`, and never changes what a program computes. Left alone where
    the user set it (``MALLOC_ARENA_MAX`` or ``GLIBC_TUNABLES``) and off glibc.

    Returns:
        True when the limit was set.
    """
    return _set_unless_user_set(_M_ARENA_MAX, MAX_HEAPS, "MALLOC_ARENA_MAX", "arena_max")


@functools.cache
def cap_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process (once).

    Process-wide and lasting, like GDAL's cache size: it changes only where large blocks
    come from, never what a program computes. Left alone where the user set the threshold
    (``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES``) and off glibc (macOS, musl).

    Returns:
        True when the threshold was set.
    """
    return _set_unless_user_set(_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "mmap_threshold")
