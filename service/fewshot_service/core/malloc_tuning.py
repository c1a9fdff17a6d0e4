"""glibc's malloc, told to keep large freed buffers for reuse: set once when a server starts.

A decode job hands the server megabytes of pixels, and a batch and its model output are large as
well. In a process of many threads glibc serves blocks that size with fresh ``mmap``s and gives
them back to the kernel on ``free``, so each job pays a page fault for every page of memory the
previous job just returned. With the mmap threshold at glibc's maximum and a high trim
threshold, freed blocks stay in the heap, already mapped, for the next job. The cost: the
process may keep up to :data:`TRIM_THRESHOLD_BYTES` of freed memory per heap in its RSS rather
than returning it at once. The decode workers keep glibc's defaults: one thread, whose dynamic
threshold already adapts, and whose address space is capped (decode_worker.py).

A no-op where the C library has no ``mallopt`` (musl's, macOS's).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


def reuse_freed_buffers() -> bool:
    """Set both thresholds; False where this C library cannot (nothing changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
