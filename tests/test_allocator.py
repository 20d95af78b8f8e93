"""The server's malloc settings: upload pieces are reused heap memory, not fresh pages each time."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from flora.server.allocator import MAX_MMAP_THRESHOLD, MIN_MMAP_THRESHOLD, malloc_settings

MiB = 1 << 20
GLIBC = ctypes.util.find_library("c") is not None and sys.platform.startswith("linux")

# Allocates and fills a 1 MiB buffer 200 times (as a piece's copies are) after the given tuning and
# prints the minor page faults that took: a buffer taken from fresh pages faults 256 times.
_FAULTS = """
import json, resource, sys
from flora.server.allocator import tune_malloc
applied = tune_malloc(int(sys.argv[1])) if sys.argv[1] != "pinned" else None
if applied is None:  # the first version's setting: every buffer above 256 KiB mmapped
    import ctypes
    applied = bool(ctypes.CDLL("libc.so.6").mallopt(-3, 256 << 10))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    piece = bytearray(1 << 20)
    del piece
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(setting: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", _FAULTS, setting], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout)


@pytest.mark.parametrize("chunk", [4096, MiB, 3 * MiB, 16 * MiB])
def test_settings_keep_a_message_of_two_chunks_on_the_heap(chunk: int) -> None:
    settings = malloc_settings(chunk)
    assert settings.mmap_threshold >= min(2 * chunk, MAX_MMAP_THRESHOLD)
    assert MIN_MMAP_THRESHOLD <= settings.mmap_threshold <= MAX_MMAP_THRESHOLD
    assert settings.trim_threshold > settings.mmap_threshold  # a freed piece is not trimmed straight away
    assert settings.arena_max == 2


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_tuned_pieces_reuse_heap_memory_where_pinned_mmaps_fault_every_time() -> None:
    tuned, pinned = _faults(str(MiB)), _faults("pinned")
    assert tuned["applied"] and pinned["applied"]
    assert pinned["faults"] >= 200 * 200  # ~256 per buffer: fresh zeroed pages each time
    assert tuned["faults"] < 2000  # the first buffer's pages, then the same memory again


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_tuning_can_be_turned_off() -> None:
    assert _faults(str(MiB), {**os.environ, "FLORA_MALLOC_TUNING": "off"})["applied"] is False
