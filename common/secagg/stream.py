"""Secure aggregation's large payloads in chunks: the masked vectors up, the MASK step's downloads down.

A masked vector is as large as the plan makes it (8 bytes per entry: hundreds of MB for a 1B
model), and so is Q; no message may be (DESIGN.md section 3). Both directions reuse the plain
transfers' machinery (``flora.common.chunks``, ``flora.common.wire``):

- up, ``SubmitMasked``: a ``MaskedHeader`` announcing the lengths, total bytes and sha256, then
  ``UpdatePiece``s, exactly like a SubmitUpdate stream. ``receive_masked`` checks the header
  against the step's lengths before it allocates anything, so the buffer is sized by the plan,
  never by what a client declared, then verifies offsets, size and hash as a plain upload's;
- down, ``FetchSecure``: the step announces each payload's size and sha256 (``download_of``); the
  client checks the size against what its own plan implies before a byte arrives, then receives
  ``Chunk``s into a buffer of exactly that size (``Download``), resuming at the bytes it holds
  after an interrupted stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Sequence

import numpy as np

from flora.common.chunks import ChunkReceiver, check_sha256
from flora.common.secagg.wire import read_vector, vector_bytes
from flora.common.wire import Piece, WireError, receive_update, update_messages
from flora.v1 import secagg_pb2 as sa, transfer_pb2

KIND_NAMES = {transfer_pb2.ARTIFACT_KIND_SECURE_INBOX: "inbox", transfer_pb2.ARTIFACT_KIND_SECURE_SKETCH: "sketch"}


class BufferSink:
    """A ``Sink`` writing consecutive bytes into a buffer allocated up front (never grown)."""

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self._view = memoryview(self.buffer)
        self._at = 0

    def write(self, data: bytes | memoryview, /) -> int:
        end = self._at + len(data)
        self._view[self._at:end] = data
        self._at = end
        return len(data)


# --- up: SubmitMasked ------------------------------------------------------------------------------

def masked_messages(round_id: int, stage: int, vectors: Sequence[np.ndarray], chunk_size: int) -> Iterator[sa.MaskedChunk]:
    """The SubmitMasked stream of one stage's masked vectors: the header, then the bytes in pieces."""
    data = b"".join(vector_bytes(v) for v in vectors)
    header = sa.MaskedHeader(round=round_id, stage=stage, lengths=[v.size for v in vectors], total_bytes=len(data),
                             sha256=hashlib.sha256(data).hexdigest())
    return update_messages(header, data, chunk_size, chunk_type=sa.MaskedChunk)


async def first_header(messages: AsyncIterator[sa.MaskedChunk | Piece]) -> sa.MaskedHeader:
    """The SubmitMasked stream's header, which must be its first message."""
    first = await anext(messages, None)
    if first is None or isinstance(first, Piece) or first.WhichOneof("content") != "header":
        raise WireError("header: the first message of a SubmitMasked stream must be the header")
    return first.header


def check_masked_header(header: sa.MaskedHeader, lengths: Sequence[int]) -> int:
    """The bytes the header's vectors take; ValueError naming the field when it is not the step's."""
    if list(header.lengths) != list(lengths):
        raise ValueError(f"header.lengths {list(header.lengths)[:8]} are not the step's {list(lengths)[:8]}")
    expected = 8 * sum(lengths)
    if header.total_bytes != expected:
        raise ValueError(f"header.total_bytes {header.total_bytes} is not the step's {expected} (8 bytes per entry)")
    check_sha256(header.sha256, "header.sha256")
    return expected


async def receive_masked(header: sa.MaskedHeader, rest: AsyncIterable[sa.MaskedChunk | Piece],
                         lengths: Sequence[int]) -> tuple[np.ndarray, ...]:
    """The vectors of a SubmitMasked stream whose ``header`` was read, verified against ``lengths``.

    ValueError (the header), ``WireError`` (order) or ``ChunkError`` (gap, overlap, size, hash)
    before anything is returned; memory is the step's size, allocated only once the header matched.
    """
    total = check_masked_header(header, lengths)
    sink = BufferSink(total)

    async def stream() -> AsyncIterator[sa.MaskedChunk | Piece]:
        yield sa.MaskedChunk(header=header)
        async for message in rest:
            yield message

    await receive_update(stream(), sink, total)
    view, starts = memoryview(sink.buffer), np.cumsum([0, *lengths]) * 8
    return tuple(read_vector(view[a:b], n) for a, b, n in zip(starts[:-1], starts[1:], lengths))


# --- down: FetchSecure -----------------------------------------------------------------------------

def download_of(kind: int, data: bytes) -> sa.StepDownload:
    """The MASK step's announcement of a payload the client fetches."""
    return sa.StepDownload(kind=kind, total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


class Download:
    """One MASK step payload arriving over FetchSecure: checked against the size the client expects
    before any byte, verified as it arrives, resumable at ``received`` after an interrupted stream."""

    def __init__(self, announced: sa.StepDownload, expected: int, round_id: int, stage: int) -> None:
        self.kind, self.round, self.stage = announced.kind, round_id, stage
        self.name = KIND_NAMES.get(announced.kind, str(announced.kind))
        if announced.kind not in KIND_NAMES:
            raise ValueError(f"secure_aggregation: MaskStep download kind {announced.kind} is not a secure payload")
        if announced.total_bytes != expected:
            raise ValueError(f"secure_aggregation: MaskStep.{self.name}.total_bytes {announced.total_bytes} is not the "
                             f"{expected} bytes this client's plan implies")
        self.sha256 = announced.sha256
        self._sink = BufferSink(expected)
        self._chunks = ChunkReceiver(self._sink, expected, announced.sha256, expected)

    @property
    def received(self) -> int:
        """Bytes held so far: where a resumed FetchSecure starts."""
        return self._chunks.received

    def request(self) -> sa.FetchSecureRequest:
        """The FetchSecure request for the bytes still missing."""
        return sa.FetchSecureRequest(round=self.round, stage=self.stage, kind=self.kind, offset=self.received)

    def feed(self, chunk: transfer_pb2.Chunk) -> None:
        """Take the next chunk of the stream (``WireError``/``ChunkError`` when it is not the payload's)."""
        if (chunk.kind, chunk.version, chunk.total_bytes, chunk.sha256) != (self.kind, self.round,
                                                                             self._chunks.total_bytes, self.sha256):
            raise WireError(f"{self.name}: a chunk at offset {chunk.offset} is not of the announced payload "
                            f"(kind {chunk.kind}, version {chunk.version}, total_bytes {chunk.total_bytes})")
        self._chunks.add(chunk.offset, chunk.data)

    def finish(self) -> bytearray:
        """The whole payload, verified (``ChunkError`` when truncated or its sha256 differs)."""
        self._chunks.finish()
        return self._sink.buffer
