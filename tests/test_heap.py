"""glibc's mmap threshold, fixed for a run (geovae.heap)."""

from __future__ import annotations

import ctypes
import platform

import numpy as np
import pytest

from geovae.heap import MMAP_THRESHOLD, cap_mmap_threshold

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mapped_blocks() -> int:
    """Allocations malloc serves with their own mapping now (``mallinfo2().hblks``)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblks)


def test_blocks_of_a_few_mib_are_mapped_once_the_threshold_is_fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default glibc raises its threshold to each mapped block freed (up to 32 MiB), so a
    5 MiB array after a 20 MiB one comes from a heap and its pages stay when it is freed;
    with the threshold fixed it is mapped, and unmapped when freed."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    cap_mmap_threshold.cache_clear()
    assert cap_mmap_threshold()
    big = np.ones(20 * 2**20, np.uint8)
    del big
    before = _mapped_blocks()
    block = np.ones(MMAP_THRESHOLD + 2**20, np.uint8)
    assert _mapped_blocks() == before + 1
    del block
    assert _mapped_blocks() == before


def test_a_threshold_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    cap_mmap_threshold.cache_clear()
    try:
        assert not cap_mmap_threshold()
    finally:
        cap_mmap_threshold.cache_clear()
