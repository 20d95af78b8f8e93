"""Payloads in pieces: cutting bytes or files into offset chunks and putting them back together.

Large payloads never travel as one message (DESIGN.md section 3), so both directions of every
transfer reduce to the two halves here: ``iter_chunks`` reads a payload one bounded chunk at a
time, and ``ChunkReceiver`` writes an ordered stream of chunks into a sink while hashing it,
refusing anything that is not exactly the next bytes of a payload of the announced size and
sha256. Neither half ever holds more than one chunk, and neither knows about protobuf: that
translation lives in ``flora.common.wire``.

Files land atomically through ``publish`` (fsync, rename, fsync of the folder), or
``write_atomic`` for small files written at once, so a crash leaves either the old file or the
complete new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

DEFAULT_CHUNK_SIZE = 1 << 20

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK = 1 << 20

Source = bytes | bytearray | memoryview | Path


class ChunkError(ValueError):
    """A chunk stream that is not exactly the announced payload (gap, overlap, size, hash)."""


class Partial(NamedTuple):
    """The prefix of a payload already on disk: its size and the hash state over it."""

    size: int
    digest: hashlib._Hash


def check_sha256(value: str, what: str = "sha256") -> str:
    """Reject anything but 64 lowercase hex digits, so that hashes compare as plain strings."""
    if not _SHA256_HEX.fullmatch(value):
        raise ChunkError(f"{what} must be 64 lowercase hex digits, got {value[:80]!r}")
    return value


def check_announcement(total_bytes: int, sha256: str, max_bytes: int) -> None:
    """Refuse a payload by what its sender announced, before a single byte is stored."""
    if not 0 <= total_bytes <= max_bytes:
        raise ChunkError(f"total_bytes is {total_bytes}; the limit is {max_bytes}")
    check_sha256(sha256)


def source_size(source: Source) -> int:
    """Size in bytes of an in-memory payload or a file."""
    if isinstance(source, Path):
        return source.stat().st_size
    return memoryview(source).nbytes


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks so that memory does not grow with the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def iter_chunks(source: Source, chunk_size: int, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, data)`` pieces of ``source`` from ``offset`` to its end.

    A file is read one chunk at a time and only up to the size it had when iteration began, so
    a file that grows meanwhile cannot push a stream past the size it announced. At least one
    piece is always yielded: when nothing is left (an empty payload, or a resume at its very
    end) it is one empty piece at the end, which is how a stream still announces the payload.
    """
    if chunk_size <= 0:
        raise ChunkError(f"chunk_size must be > 0, got {chunk_size}")
    size = source_size(source)
    if not 0 <= offset <= size:
        raise ChunkError(f"offset {offset} is outside the {size}-byte payload")
    if offset == size:
        yield offset, b""
        return
    if isinstance(source, Path):
        yield from _iter_file(source, chunk_size, offset, size)
        return
    view = memoryview(source).cast("B")
    for start in range(offset, size, chunk_size):
        yield start, bytes(view[start : start + chunk_size])


def _iter_file(path: Path, chunk_size: int, offset: int, size: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as file:
        file.seek(offset)
        for start in range(offset, size, chunk_size):
            data = file.read(min(chunk_size, size - start))
            if not data:
                raise ChunkError(f"{path} shrank to {start} bytes while being read; it had {size}")
            yield start, data


def open_partial(path: Path) -> tuple[BinaryIO, Partial]:
    """Open a partial download for appending, with the hash state of what it already holds.

    Resuming must verify the whole payload's sha256 at the end, so the prefix already on disk is
    re-hashed once here (streaming) instead of being trusted. The file is created if missing.
    """
    file = open(path, "a+b")  # noqa: SIM115 - the caller owns and closes it
    try:
        file.seek(0)
        digest = hashlib.sha256()
        size = 0
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    except BaseException:
        file.close()
        raise
    return file, Partial(size, digest)


class Sink(Protocol):
    """Where a receiver writes a payload: a binary file, or a wrapper of one that allocates ahead."""

    def write(self, data: bytes | memoryview, /) -> int | None: ...


class ChunkReceiver:
    """Write an ordered chunk stream into ``sink``, accepting only the exact announced payload.

    Chunks must arrive in order with no gap and no overlap, so a receiver needs no buffer and no
    bookkeeping beyond a byte count and a running hash. Empty chunks are accepted only once the
    payload is complete (how a zero-byte payload or a resume at the very end is announced);
    while bytes remain, an empty chunk is rejected, so that a peer cannot keep a stream alive
    with messages that make no progress.
    """

    def __init__(
        self,
        sink: Sink,
        total_bytes: int,
        sha256: str,
        max_bytes: int,
        *,
        prefix: Partial | None = None,
    ) -> None:
        check_announcement(total_bytes, sha256, max_bytes)
        self._expected = sha256
        self._sink = sink
        self.total_bytes = total_bytes
        self.received = prefix.size if prefix else 0
        self._digest = prefix.digest if prefix else hashlib.sha256()
        if self.received > total_bytes:
            raise ChunkError(f"{self.received} bytes already received exceed total_bytes={total_bytes}")

    def add(self, offset: int, data: bytes | memoryview) -> None:
        """Append the chunk ``data`` that starts at byte ``offset`` of the payload."""
        if offset > self.received:
            raise ChunkError(f"chunk at offset {offset} leaves a gap: expected offset {self.received}")
        if offset < self.received:
            raise ChunkError(
                f"chunk at offset {offset} overlaps bytes already received: expected offset {self.received}"
            )
        if not data and self.received < self.total_bytes:
            raise ChunkError(
                f"empty chunk at offset {offset} while {self.total_bytes - self.received} bytes remain"
            )
        if self.received + len(data) > self.total_bytes:
            raise ChunkError(
                f"chunk at offset {offset} of {len(data)} bytes runs past total_bytes={self.total_bytes}"
            )
        self._sink.write(data)
        self._digest.update(data)
        self.received += len(data)

    def finish(self) -> None:
        """Check that the stream was complete and hashes to the announced sha256."""
        if self.received < self.total_bytes:
            raise ChunkError(f"stream truncated: received {self.received} of total_bytes={self.total_bytes}")
        actual = self._digest.hexdigest()
        if actual != self._expected:
            raise ChunkError(
                f"sha256 mismatch over {self.total_bytes} bytes: got {actual}, expected {self._expected}"
            )


def fsync_file(file: BinaryIO) -> None:
    """Flush Python's buffer and the OS cache of an open file, before it is renamed into place."""
    file.flush()
    os.fsync(file.fileno())


def fsync_path(path: Path) -> None:
    """fsync a closed, fully written file by name (its data and size reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Rename a fully written, fsynced file over ``final`` and make the rename itself durable.

    ``os.replace`` is atomic on POSIX; the fsync of the folder afterwards persists the new
    directory entry, so that after a crash ``final`` is either the old file or the new one.
    """
    os.replace(staged, final)
    fsync_dir(final.parent)


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a new file or subfolder name) durable."""
    fsync_path(folder)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a fresh temporary file created with ``mode``, then publish it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            fsync_file(file)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
