"""PreallocatedWriter: an upload's file allocated a window ahead of its bytes, never past the announced size."""

from __future__ import annotations

import errno
import os

import pytest

from flora.server import preallocation
from flora.server.preallocation import PreallocatedWriter

KiB = 1 << 10


def pieces(total: int, size: int) -> list[bytes]:
    data = os.urandom(total)
    return [data[i:i + size] for i in range(0, total, size)]


def test_the_file_holds_exactly_the_bytes_written(tmp_path) -> None:
    chunks = pieces(100 * KiB + 17, 8 * KiB)
    with open(tmp_path / "u", "wb") as file:
        writer = PreallocatedWriter(file, sum(map(len, chunks)), window=32 * KiB)
        for chunk in chunks:
            assert writer.write(chunk) == len(chunk)
    assert (tmp_path / "u").read_bytes() == b"".join(chunks)


def test_allocation_runs_one_window_ahead_and_stops_at_the_announced_size(tmp_path) -> None:
    path = tmp_path / "u"
    with open(path, "wb") as file:
        writer = PreallocatedWriter(file, 100 * KiB, window=32 * KiB)
        writer.write(b"x" * KiB)
        assert writer.allocated == 33 * KiB
        assert os.stat(path).st_size == 33 * KiB  # the space is allocated (posix_fallocate grows the size)
        for _ in range(33):
            writer.write(b"y" * KiB)
        assert writer.allocated == 66 * KiB  # refilled once, when the write passed 33 KiB
        for _ in range(66):
            writer.write(b"y" * KiB)
        assert writer.allocated == 100 * KiB  # 100 KiB written: 132 would pass the announced 100
    assert os.stat(path).st_size == 100 * KiB


def test_an_announced_size_that_never_arrives_holds_one_window_not_the_limit(tmp_path) -> None:
    path = tmp_path / "u"
    with open(path, "wb") as file:
        writer = PreallocatedWriter(file, 1 << 40, window=64 * KiB)  # a terabyte announced
        writer.write(b"z" * KiB)
    assert os.stat(path).st_size == 65 * KiB


def test_a_filesystem_that_cannot_allocate_gets_plain_writes(tmp_path, monkeypatch) -> None:
    calls = []

    def unsupported(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(preallocation.os, "posix_fallocate", unsupported)
    chunks = pieces(50 * KiB, 4 * KiB)
    with open(tmp_path / "u", "wb") as file:
        writer = PreallocatedWriter(file, 50 * KiB, window=8 * KiB)
        for chunk in chunks:
            writer.write(chunk)
    assert (tmp_path / "u").read_bytes() == b"".join(chunks)
    assert len(calls) == 1 and writer.allocated == 0  # tried once, then plain appends


def test_a_full_disk_raises_enospc_for_the_caller_to_map(tmp_path, monkeypatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preallocation.os, "posix_fallocate", full)
    with open(tmp_path / "u", "wb") as file:
        writer = PreallocatedWriter(file, 10 * KiB)
        with pytest.raises(OSError) as raised:
            writer.write(b"x")
    assert raised.value.errno == errno.ENOSPC


def test_an_empty_payload_allocates_nothing(tmp_path) -> None:
    with open(tmp_path / "u", "wb") as file:
        writer = PreallocatedWriter(file, 0)
        writer.write(b"")
        assert writer.allocated == 0
    assert os.stat(tmp_path / "u").st_size == 0


def test_reserve_allocates_the_first_window_so_a_payload_within_it_writes_without_allocating(tmp_path, monkeypatch) -> None:
    calls = []
    real = preallocation.os.posix_fallocate
    monkeypatch.setattr(preallocation.os, "posix_fallocate",
                        lambda fd, offset, length: (calls.append((offset, length)), real(fd, offset, length)))
    with open(tmp_path / "small", "wb") as file:
        writer = PreallocatedWriter(file, 20 * KiB, window=32 * KiB)
        writer.reserve()  # where the server creates the file: in a worker thread
        assert calls == [(0, 20 * KiB)]
        for chunk in pieces(20 * KiB, 4 * KiB):
            writer.write(chunk)  # on the event loop, for small pieces: no allocation call there
    assert calls == [(0, 20 * KiB)]
    with open(tmp_path / "large", "wb") as file:
        writer = PreallocatedWriter(file, 100 * KiB, window=32 * KiB)
        writer.reserve()
        writer.write(b"x" * 40 * KiB)  # past the first window: the next one from where the bytes are
    assert calls[1:] == [(0, 32 * KiB), (32 * KiB, 40 * KiB)] and writer.allocated == 72 * KiB
