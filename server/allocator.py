"""glibc malloc settings that keep the memory of concurrent uploads bounded (bench/uploadmem.py).

Upload pieces are ~1 MiB buffers allocated and freed by grpc, protobuf and the writer threads.
glibc serves them with mmap at first, but raises its mmap threshold after each such free, so that
soon they come from per-thread heap arenas, which grow with the number of streams in flight and
rarely shrink: RSS climbs with the bytes in flight instead of staying at a few chunks per stream.
Pinning the threshold (which also turns the dynamic raise off) keeps every piece an mmap that
goes back to the OS when freed; capping the arenas bounds what the small allocations keep.
Set ``FLORA_MALLOC_TUNING=off`` to leave glibc's defaults (how the benchmark measures both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt parameters from glibc's malloc.h
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 << 10  # allocations from this size on are mmapped (and returned when freed)
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Apply the settings above where the C library is glibc; True when they were applied."""
    if os.environ.get("FLORA_MALLOC_TUNING", "on").lower() in ("off", "0", "false", "no"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
    log.debug("malloc tuning %s: mmap threshold %d bytes, %d arenas", "applied" if applied else "refused",
              MMAP_THRESHOLD, ARENA_MAX)
    return applied
