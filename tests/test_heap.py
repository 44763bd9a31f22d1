"""glibc's mmap threshold, fixed for a run (geovae.heap)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys

import pytest

from geovae.heap import MAX_HEAPS, cap_mmap_threshold, limit_heaps

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


# In a fresh interpreter: malloc serves a request from a free chunk of a heap, mapping it only
# where none is large enough, and a long-lived test process has plenty of freed heap. Prints
# the mapped blocks (``mallinfo2().hblks``) before, with and after a block just above the
# threshold, allocated after a 20 MiB one was freed (which raises glibc's default threshold).
STEPS = """
import ctypes, sys
import numpy as np
from geovae.heap import MMAP_THRESHOLD, cap_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "capped":
    assert cap_mmap_threshold()
big = np.ones(20 * 2**20, np.uint8)
del big
before = libc.mallinfo2().hblks
block = np.ones(MMAP_THRESHOLD + 2**20, np.uint8)
during = libc.mallinfo2().hblks
del block
print(before, during, libc.mallinfo2().hblks)
"""


MALLOC_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
)


def _fresh(script: str, mode: str) -> str:
    """What ``script`` prints in a fresh interpreter started with glibc's malloc defaults."""
    # Setting any of these turns glibc's dynamic threshold off, and Dask's nanny puts
    # MALLOC_TRIM_THRESHOLD_ into the environment of a process that starts a local cluster.
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS}
    return subprocess.run(
        [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, check=True
    ).stdout


def _mapped_blocks(mode: str) -> tuple[int, int, int]:
    before, during, after = (int(v) for v in _fresh(STEPS, mode).split())
    return before, during, after


def test_blocks_of_a_few_mib_are_mapped_once_the_threshold_is_fixed() -> None:
    """By default glibc raises its threshold to each mapped block freed (up to 32 MiB), so a
    5 MiB array after a 20 MiB one comes from a heap and its pages stay when it is freed;
    with the threshold fixed it is mapped, and unmapped when freed."""
    before, during, after = _mapped_blocks("capped")
    assert (during, after) == (before + 1, before)


def test_without_the_fixed_threshold_the_block_comes_from_a_heap() -> None:
    # The control: the default threshold does keep the block off its own mapping, so the
    # test above can fail.
    before, during, _ = _mapped_blocks("default")
    assert during == before


@pytest.mark.parametrize(
    "setting, env, value",
    [(cap_mmap_threshold, "MALLOC_MMAP_THRESHOLD_", "1048576"), (limit_heaps, "MALLOC_ARENA_MAX", "4")],
)
def test_a_setting_the_user_made_is_kept(
    monkeypatch: pytest.MonkeyPatch, setting: functools._lru_cache_wrapper[bool], env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    setting.cache_clear()
    try:
        assert not setting()
    finally:
        setting.cache_clear()


# In a fresh interpreter: 8 threads each allocate a small block; prints how many heaps
# (glibc's arenas, ``malloc_info``'s <heap> elements) the process then has.
HEAPS = """
import ctypes, os, sys, tempfile, threading
import numpy as np
from geovae.heap import limit_heaps

if sys.argv[1] == "limited":
    assert limit_heaps()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
held, start = [], threading.Barrier(8)

def work():
    start.wait()
    held.append(np.ones(4096))

threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
fd, path = tempfile.mkstemp()
os.close(fd)
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""


def _heaps(mode: str) -> int:
    return int(_fresh(HEAPS, mode))


def test_threads_share_the_limited_heaps() -> None:
    """By default each new thread that allocates gets a heap of its own (up to 8 per core),
    keeping what it frees; with the limit the run's threads share MAX_HEAPS of them."""
    assert _heaps("limited") <= MAX_HEAPS
    # The control: without the limit the same threads make heaps of their own.
    assert _heaps("default") > MAX_HEAPS
