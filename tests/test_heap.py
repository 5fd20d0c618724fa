"""heap.py: freed heap pages go back to the OS, and the ceiling trims only past its slack."""

import sys

import pytest
import torch

from metarec.heap import HeapCeiling, release_free_memory, resident_bytes

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)"
)


def _holes(n: int) -> list[torch.Tensor]:
    """``n`` 64 KB tensors, written (resident) and heap-allocated (under glibc's mmap
    threshold); every other one freed, so the free ones sit between live ones."""
    blocks = [torch.ones(16384) for _ in range(n)]
    return blocks[::2]


@glibc_only
def test_a_trim_returns_the_holes_freed_tensors_leave_inside_the_heap():
    before = resident_bytes()
    kept = _holes(4000)  # 256 MB written, 128 MB of it freed in 64 KB holes
    grown = resident_bytes()
    assert grown - before > 200e6
    assert release_free_memory()
    assert grown - resident_bytes() > 0.7 * 128e6  # the holes, not the live half
    assert all(bool((t == 1).all()) for t in kept[:: len(kept) // 10])  # live data intact


@glibc_only
def test_the_ceiling_trims_once_rss_passes_its_slack_and_not_before():
    ceiling = HeapCeiling(slack=64 << 20)
    ceiling.check()
    assert ceiling.trims == 0  # nothing grew
    kept = []
    for _ in range(8):  # 8 x 16 MB of holes
        kept += _holes(512)
        ceiling.check()
    assert 1 <= ceiling.trims <= 4
    assert len(kept) == 8 * 256
