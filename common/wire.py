"""The one place that turns payloads into flora.v1 transfer messages and back.

Both large transfers of the protocol (DESIGN.md section 3) are built from ``flora.common.chunks``:

- download (``FetchGlobal``): ``artifact_chunks`` streams one artifact as ``Chunk`` messages;
  ``ArtifactReceiver`` / ``receive_artifacts`` write a stream of consecutive versions into one
  file per version, each staged as ``<path>.part``, verified, then renamed into place, so that a
  crash never leaves a half-written final file and the ``.part`` is what a resume continues;
- upload (``SubmitUpdate``, and secure aggregation's ``SubmitMasked``, whose ``MaskedChunk`` has
  the same header-then-pieces shape): ``update_messages`` gives the header and then the pieces as
  messages, ``encoded_update_messages`` the same bytes already serialised (what the client sends:
  one copy per piece fewer); the server's ``decode_update_chunk`` takes each piece as a view of
  the received bytes, and
  ``UpdateReceiver`` / ``receive_update`` enforce header-first-and-once and verify the bytes.

The receivers are plain state machines fed one message at a time; the async helpers only drive
them from a ``grpc.aio`` stream, running each large step in a worker thread because writing,
hashing (which releases the GIL) and fsync are blocking work that must stay off the event loop
(a small piece costs less than the hop to a thread: see ``INLINE_BYTES``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple

from flora.common.chunks import (
    DEFAULT_CHUNK_SIZE,
    ChunkError,
    ChunkReceiver,
    Sink,
    Source,
    check_announcement,
    check_sha256,
    fsync_file,
    iter_chunks,
    open_partial,
    publish,
    source_size,
)
from flora.v1 import coordinator_pb2, secagg_pb2, transfer_pb2

# The upload's method path, for calls and interceptors that handle its messages' bytes themselves.
SUBMIT_UPDATE = f"/{coordinator_pb2.DESCRIPTOR.services_by_name['Coordinator'].full_name}/SubmitUpdate"

PathFor = Callable[[int, int], Path]
# A stream of a header (with total_bytes and sha256) exactly once and first, then UpdatePieces.
HeaderFirst = transfer_pb2.UpdateChunk | secagg_pb2.MaskedChunk
# Upload pieces up to this size are written and hashed on the event loop (tens of microseconds);
# larger ones in a worker thread, overlapping the next message's arrival.
INLINE_BYTES = 64 << 10


class WireError(ChunkError):
    """A message stream that breaks the protocol (order, header, kinds, versions)."""


class Artifact(NamedTuple):
    """One downloaded artifact, verified and in its final place."""

    kind: int
    version: int
    path: Path
    sha256: str


def artifact_chunks(
    kind: int,
    version: int,
    source: Source,
    sha256: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    offset: int = 0,
) -> Iterator[transfer_pb2.Chunk]:
    """Stream one artifact from ``offset`` on (the FetchGlobal response for one version).

    Every message repeats kind, version, total_bytes and sha256, so a client can tell where one
    version ends and the next begins, and resume any of them, without any other framing.
    """
    check_sha256(sha256)
    total = source_size(source)
    for start, data in iter_chunks(source, chunk_size, offset):
        yield transfer_pb2.Chunk(
            kind=kind, version=version, offset=start, total_bytes=total, sha256=sha256, data=data
        )


def update_messages(
    header: transfer_pb2.UpdateHeader | secagg_pb2.MaskedHeader, source: Source, chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_type: type[HeaderFirst] = transfer_pb2.UpdateChunk,
) -> Iterator[HeaderFirst]:
    """The SubmitUpdate stream (or SubmitMasked's, ``chunk_type`` MaskedChunk): the header, then
    the payload in pieces."""
    _check_update_header(header, source)
    yield chunk_type(header=header)
    for start, data in iter_chunks(source, chunk_size):
        yield chunk_type(piece=transfer_pb2.UpdatePiece(offset=start, data=data))


def encoded_update_messages(
    header: transfer_pb2.UpdateHeader, source: Source, chunk_size: int = DEFAULT_CHUNK_SIZE,
    sent: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """``update_messages`` already serialised (the same bytes), for a call without a serializer;
    ``sent(n)`` is told each piece's payload bytes once gRPC has taken it.

    A piece costs one copy (its few bytes of framing joined to the data read from the file)
    where building the message and serialising it cost two more: the uploading client's largest
    cost (bench/transport.py, 2026-12-03: 256 MiB end to end 333-364 -> 364-489 MB/s).
    """
    _check_update_header(header, source)
    yield transfer_pb2.UpdateChunk(header=header).SerializeToString()
    for start, data in iter_chunks(source, chunk_size):
        yield encode_piece(start, data)
        if sent is not None:
            sent(len(data))


def encode_piece(offset: int, data: bytes) -> bytes:
    """``UpdateChunk(piece=UpdatePiece(offset=offset, data=data)).SerializeToString()``, byte for
    byte (proto3 leaves out a zero offset and empty data), with ``data`` copied once."""
    fields = (_OFFSET_TAG + _varint(offset) if offset else b"") + (_DATA_TAG + _varint(len(data)) if data else b"")
    return b"".join((_PIECE_TAG, _varint(len(fields) + len(data)), fields, data))


class Piece(NamedTuple):
    """An upload piece decoded without a copy: ``data`` is a view into the received message."""

    offset: int
    data: bytes | memoryview


def decode_update_chunk(raw: bytes) -> transfer_pb2.UpdateChunk | Piece:
    """SubmitUpdate's request deserializer: a piece laid out as protobuf writes it (``encode_piece``:
    the piece field alone, then its offset, then its data) as a ``Piece`` viewing ``raw``; any
    other message (the header, another field order, unknown fields) parsed by protobuf, which
    also refuses what is malformed. Protobuf's parse copies a piece's data twice (into the message
    and out of it as bytes) on the event loop: bench.transport 256 MiB +8% end to end without.
    """
    piece = _piece_view(raw)
    return piece if piece is not None else transfer_pb2.UpdateChunk.FromString(raw)


def _piece_view(raw: bytes) -> Piece | None:
    """The piece ``raw`` holds in ``encode_piece``'s layout, or None for any other layout."""
    if raw[:1] != _PIECE_TAG:
        return None
    length, at = _read_varint(raw, 1)
    if length < 0 or at + length != len(raw):
        return None
    offset = 0
    if raw[at : at + 1] == _OFFSET_TAG:
        offset, at = _read_varint(raw, at + 1)
        if offset < 0:
            return None
    if at == len(raw):
        return Piece(offset, b"")
    if raw[at : at + 1] != _DATA_TAG:
        return None
    length, at = _read_varint(raw, at + 1)
    if length < 0 or at + length != len(raw):
        return None
    return Piece(offset, memoryview(raw)[at:])


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    """The varint at ``at`` and where it ends; (-1, at) where none ends within 10 bytes and
    below 2^64 (then the caller leaves the message to protobuf)."""
    value = 0
    for shift in range(0, 70, 7):
        if at >= len(raw):
            break
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, at) if value < 1 << 64 else (-1, at)
    return -1, at


def _check_update_header(header: transfer_pb2.UpdateHeader | secagg_pb2.MaskedHeader, source: Source) -> None:
    check_sha256(header.sha256, "header sha256")
    if header.total_bytes != (size := source_size(source)):
        raise WireError(f"header total_bytes={header.total_bytes} but the payload is {size} bytes")


def _field_tag(message: type, name: str, wire_type: int) -> bytes:
    """A field's key on the wire (its number and wire type, one byte for numbers below 16)."""
    return _varint(message.DESCRIPTOR.fields_by_name[name].number << 3 | wire_type)


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_VARINT, _LENGTH_DELIMITED = 0, 2
_PIECE_TAG = _field_tag(transfer_pb2.UpdateChunk, "piece", _LENGTH_DELIMITED)
_OFFSET_TAG = _field_tag(transfer_pb2.UpdatePiece, "offset", _VARINT)
_DATA_TAG = _field_tag(transfer_pb2.UpdatePiece, "data", _LENGTH_DELIMITED)


class UpdateReceiver:
    """Consume a SubmitUpdate (or SubmitMasked) stream into ``sink``: the header exactly once and
    first, then pieces."""

    def __init__(self, sink: Sink, max_bytes: int) -> None:
        self._sink = sink
        self._max_bytes = max_bytes
        self._messages = 0
        self._chunks: ChunkReceiver | None = None
        self.header: transfer_pb2.UpdateHeader | secagg_pb2.MaskedHeader | None = None

    def feed(self, message: HeaderFirst | Piece) -> None:
        """Take the next message of the stream (a ``Piece`` as ``decode_update_chunk`` gives it)."""
        self._messages += 1
        if isinstance(message, Piece):
            self._piece(message.offset, message.data)
            return
        content = message.WhichOneof("content")
        if content == "header":
            if self.header is not None:
                raise WireError(f"message {self._messages} is a second header; the header comes once")
            self._chunks = ChunkReceiver(
                self._sink, message.header.total_bytes, message.header.sha256, self._max_bytes
            )
            self.header = message.header
        elif content == "piece":
            self._piece(message.piece.offset, message.piece.data)
        else:
            raise WireError(f"message {self._messages} holds neither a header nor a piece")

    def _piece(self, offset: int, data: bytes | memoryview) -> None:
        if self._chunks is None:
            raise WireError(f"message {self._messages} is a piece before the header")
        self._chunks.add(offset, data)

    def finish(self) -> transfer_pb2.UpdateHeader | secagg_pb2.MaskedHeader:
        """Verify that the whole payload arrived intact and return the header it came with."""
        if self._chunks is None or self.header is None:
            raise WireError("the upload stream ended before its header (no messages)")
        self._chunks.finish()
        return self.header


async def receive_update(
    messages: AsyncIterable[HeaderFirst | Piece], sink: Sink, max_bytes: int
) -> transfer_pb2.UpdateHeader | secagg_pb2.MaskedHeader:
    """Receive a whole upload from a grpc.aio request stream into ``sink`` and verify it.

    Each piece over ``INLINE_BYTES`` is written and hashed in a worker thread while the next message
    is received, so network and disk/hash work overlap; pieces stay in order (one in flight at a
    time).
    """
    receiver = UpdateReceiver(sink, max_bytes)
    in_flight: asyncio.Future | None = None
    try:
        async for message in messages:
            if in_flight is not None:
                await in_flight
                in_flight = None
            if _piece_bytes(message) <= INLINE_BYTES:
                receiver.feed(message)  # the header, or a small piece: a thread hop would cost more
            else:
                in_flight = asyncio.ensure_future(asyncio.to_thread(receiver.feed, message))
        if in_flight is not None:
            await in_flight
    finally:
        # On any error, let the piece being written finish before the caller closes the sink.
        if in_flight is not None and not in_flight.done():
            await asyncio.gather(in_flight, return_exceptions=True)
    return receiver.finish()


def _piece_bytes(message: HeaderFirst | Piece) -> int:
    if isinstance(message, Piece):
        return len(message.data)
    return len(message.piece.data) if message.WhichOneof("content") == "piece" else 0


def part_path(path: Path) -> Path:
    """Where a download of ``path`` is staged until it is verified."""
    return path.with_name(path.name + ".part")


def resume_offset(path: Path) -> int:
    """The offset to ask FetchGlobal for: what the staged download of ``path`` already holds."""
    part = part_path(path)
    return part.stat().st_size if part.exists() else 0


class _Staged(NamedTuple):
    kind: int
    version: int
    path: Path
    file: BinaryIO
    chunks: ChunkReceiver
    sha256: str


class ArtifactReceiver:
    """Write a FetchGlobal stream of consecutive versions into one verified file per version.

    ``path_for(kind, version)`` names each final file. Only the stream's first artifact may start
    at an offset > 0: it then continues the ``.part`` file already on disk (see
    ``resume_offset``). A ``.part`` whose bytes fail the sha256 is deleted, because resuming it
    could never succeed; after any other failure it is kept for the next resume. Use as a context
    manager so that an interrupted stream always closes its file.
    """

    def __init__(self, path_for: PathFor, max_bytes: int) -> None:
        self._path_for = path_for
        self._max_bytes = max_bytes
        self._staged: _Staged | None = None
        self._last: tuple[int, int] | None = None
        self._done: list[Artifact] = []

    def feed(self, chunk: transfer_pb2.Chunk) -> None:
        """Take the next message of the stream."""
        staged = self._staged
        if staged is None or (chunk.kind, chunk.version) != (staged.kind, staged.version):
            self._complete()
            staged = self._staged = self._stage(chunk)
        elif (chunk.total_bytes, chunk.sha256) != (staged.chunks.total_bytes, staged.sha256):
            raise WireError(
                f"version {chunk.version}: chunk at offset {chunk.offset} changes total_bytes/sha256 "
                f"from {staged.chunks.total_bytes}/{staged.sha256} to {chunk.total_bytes}/{chunk.sha256}"
            )
        staged.chunks.add(chunk.offset, chunk.data)

    def finish(self) -> list[Artifact]:
        """Complete the last artifact and return every artifact of the stream, in order."""
        self._complete()
        return list(self._done)

    def close(self) -> None:
        """Close the open ``.part`` file, if any, without publishing it."""
        if self._staged is not None:
            self._staged.file.close()
            self._staged = None

    def __enter__(self) -> ArtifactReceiver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _stage(self, chunk: transfer_pb2.Chunk) -> _Staged:
        if chunk.kind == transfer_pb2.ARTIFACT_KIND_UNSPECIFIED:
            raise WireError(f"version {chunk.version}: artifact kind is unspecified")
        if self._last is not None:
            if chunk.kind != self._last[0]:
                raise WireError(
                    f"version {chunk.version}: kind {chunk.kind} differs from the stream's kind {self._last[0]}"
                )
            if chunk.version <= self._last[1]:
                raise WireError(f"version {chunk.version} follows version {self._last[1]}; versions must increase")
        resume = chunk.offset > 0 and self._last is None
        self._last = (chunk.kind, chunk.version)
        check_announcement(chunk.total_bytes, chunk.sha256, self._max_bytes)
        path = Path(self._path_for(chunk.kind, chunk.version))
        if resume:
            file, prefix = open_partial(part_path(path))
        else:
            file, prefix = open(part_path(path), "wb"), None  # noqa: SIM115 - closed by _complete/close
        try:
            chunks = ChunkReceiver(file, chunk.total_bytes, chunk.sha256, self._max_bytes, prefix=prefix)
        except ChunkError:
            file.close()
            # The announcement passed, so the prefix on disk is longer than the artifact: useless.
            part_path(path).unlink(missing_ok=True)
            raise
        return _Staged(chunk.kind, chunk.version, path, file, chunks, chunk.sha256)

    def _complete(self) -> None:
        staged = self._staged
        if staged is None:
            return
        try:
            staged.chunks.finish()
        except ChunkError:
            if staged.chunks.received == staged.chunks.total_bytes:
                self.close()
                part_path(staged.path).unlink(missing_ok=True)
            raise
        fsync_file(staged.file)
        self.close()
        publish(part_path(staged.path), staged.path)
        self._done.append(Artifact(staged.kind, staged.version, staged.path, staged.sha256))


async def receive_artifacts(
    messages: AsyncIterable[transfer_pb2.Chunk], path_for: PathFor, max_bytes: int
) -> list[Artifact]:
    """Receive a whole FetchGlobal response stream into verified files, one per version."""
    with ArtifactReceiver(path_for, max_bytes) as receiver:
        async for chunk in messages:
            await asyncio.to_thread(receiver.feed, chunk)
        return await asyncio.to_thread(receiver.finish)
