"""glibc malloc settings for a server whose hot allocations are upload pieces of ``chunk_size`` bytes.

Every upload piece passes through a few buffers of about a chunk each (grpc's reads of the socket,
the message's bytes, protobuf's copy of its data field), allocated and freed per message. Two of
glibc's defaults make that expensive or unbounded:

- memory mmapped for a large allocation, or trimmed off the top of a heap when freed, comes back as
  fresh zeroed pages: every piece then pays a page fault per 4 KiB and the kernel's zeroing. An
  mmap threshold pinned below the chunk size (this module's first version) did exactly that: in a
  grpc harness receiving 1 MiB pieces, 160-210 MB/s against 1,300-1,800 with pieces from the heap,
  and the server's transfer at 0.16-0.30x a raw socket (bench/transport.py);
- glibc's own dynamic threshold does take pieces into the heap after the first free, but trims the
  heap at twice that threshold, so pieces still come back faulted from time to time (600-800 MB/s
  in the same harness), and it creates up to 8 arenas per core, which keep what they grew to.

So: allocations up to a few chunks come from the heap (``mmap_threshold``), the heap keeps up to
``trim_threshold`` free at its top instead of handing every freed piece back, and two arenas serve
all threads, so what the heap holds beyond the bytes in flight is bounded by two trim thresholds.
Tensors (validation, aggregation, the merge) are larger and stay mmapped, returned when freed. The
bytes in flight themselves are bounded by the receive window (``stream_window_bytes``).
Set ``FLORA_MALLOC_TUNING=off`` to leave glibc's defaults (how bench/uploadmem.py measures both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import NamedTuple

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MiB = 1 << 20
MIN_MMAP_THRESHOLD = 4 * _MiB  # above grpc's largest socket read (4 MiB) as well as a 1 MiB piece
MAX_MMAP_THRESHOLD = 32 * _MiB  # glibc's own ceiling for M_MMAP_THRESHOLD on 64-bit
PIECES_KEPT = 4  # free memory a heap keeps at its top, in mmap thresholds
ARENA_MAX = 2


class MallocSettings(NamedTuple):
    mmap_threshold: int
    trim_threshold: int
    arena_max: int


def malloc_settings(chunk_size: int) -> MallocSettings:
    """The settings for upload pieces of ``chunk_size`` bytes: a piece and its copies (a message may
    carry up to twice a chunk: the server's receive limit) are heap allocations."""
    threshold = min(max(2 * chunk_size, MIN_MMAP_THRESHOLD), MAX_MMAP_THRESHOLD)
    return MallocSettings(threshold, PIECES_KEPT * threshold, ARENA_MAX)


def tune_malloc(chunk_size: int) -> bool:
    """Apply ``malloc_settings(chunk_size)`` where the C library is glibc; True when applied."""
    if os.environ.get("FLORA_MALLOC_TUNING", "on").lower() in ("off", "0", "false", "no"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    settings = malloc_settings(chunk_size)
    # The mmap threshold first: setting it also turns glibc's dynamic raise of both thresholds off.
    applied = all(bool(mallopt(parameter, value)) for parameter, value in (
        (_M_MMAP_THRESHOLD, settings.mmap_threshold), (_M_TRIM_THRESHOLD, settings.trim_threshold),
        (_M_ARENA_MAX, settings.arena_max)))
    log.debug("malloc tuning %s: %s", "applied" if applied else "refused", settings)
    return applied
