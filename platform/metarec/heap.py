"""Give the pages a process freed back to the operating system.

glibc keeps freed memory in its heap for reuse and returns it only from the heap's top.
Validation adapts chunk after chunk of differently shaped tasks, so each chunk's freed
tensors leave holes the next chunk's shapes do not fill, and a long-lived Ray worker's RSS
climbs through every pass although its live memory does not. ``malloc_trim(0)`` hands the
free pages inside the heap back too (``madvise``), without moving a live byte; the pages
it returns are faulted in again when reused, so it runs only once RSS has grown by
``slack`` since the last time (``HeapCeiling``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import cache

__all__ = ["HeapCeiling", "release_free_memory", "resident_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS; whether anything could be released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def resident_bytes() -> int | None:
    """This process's resident set size (None where /proc has no ``statm``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class HeapCeiling:
    """Trims the heap whenever RSS has grown by more than ``slack`` bytes since the last
    trim (or since it was made): a bound on the growth for a few trims a pass."""

    def __init__(self, slack: int = 256 << 20) -> None:
        self.slack = slack
        self.trims = 0
        self._base = resident_bytes()

    def check(self) -> None:
        """Call between pieces of work: trims if RSS passed the last level + ``slack``."""
        now = resident_bytes()
        if now is None or self._base is None or now <= self._base + self.slack:
            return
        release_free_memory()
        self.trims += 1
        self._base = resident_bytes()
