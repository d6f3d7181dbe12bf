"""Handing freed host memory back to the OS, for the jobs whose peak RSS we report.

glibc keeps freed pages in its heap, and after a large free it raises its mmap threshold, so later
buffers of that size come from a heap that never shrinks: a layer-by-layer quantizer's RSS creeps up
block after block, and a loader that converts and repacks ~2 GB of short-lived tensors keeps them
resident. Both calls are no-ops where libc is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_large_buffers_mapped(threshold_bytes: int = 1 << 20) -> None:
    """Pin glibc's mmap threshold: buffers above it are mmapped, so freeing them returns them at once."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().mallopt(_M_MMAP_THRESHOLD, threshold_bytes)


def release_freed_memory() -> None:
    """Give what the heap holds free back to the OS (malloc_trim)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)
