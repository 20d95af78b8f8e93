"""The secure steps' streams on the server: masked vectors received in pieces, MASK payloads served in chunks.

``SecureRounds`` decides which step is open for whom; this module moves the bytes and turns a
malformed stream into the refusal a client gets (protos/PROTOCOL.md, "Secure aggregation: the
stages"): a header that is not the step's INVALID_ARGUMENT before anything is allocated, a
stream that is not exactly the announced bytes DATA_LOSS, a resume beyond a payload OUT_OF_RANGE.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence

import numpy as np

from flora.common.chunks import ChunkError
from flora.common.secagg.messages import EncryptedShare
from flora.common.secagg.stream import KIND_NAMES, download_of, first_header, receive_masked
from flora.common.secagg.wire import inbox_bytes
from flora.common.wire import Piece, WireError, artifact_chunks
from flora.server.errors import DataLoss, InvalidArgument, OutOfRange
from flora.v1 import secagg_pb2 as sa, transfer_pb2

INBOX_KIND, SKETCH_KIND = transfer_pb2.ARTIFACT_KIND_SECURE_INBOX, transfer_pb2.ARTIFACT_KIND_SECURE_SKETCH
Payload = tuple[bytes, sa.StepDownload]  # the bytes a client fetches, and the step's announcement of them


async def masked_header(messages: AsyncIterator[sa.MaskedChunk | Piece]) -> sa.MaskedHeader:
    """A SubmitMasked stream's header (INVALID_ARGUMENT when the stream does not start with one)."""
    try:
        return await first_header(messages)
    except WireError as error:
        raise InvalidArgument(f"SubmitMasked: {error}") from None


async def masked_vectors(header: sa.MaskedHeader, rest: AsyncIterator[sa.MaskedChunk | Piece],
                         lengths: Sequence[int]) -> tuple[np.ndarray, ...]:
    """The vectors after ``header``, or the refusal naming what in the stream was wrong."""
    try:
        return await receive_masked(header, rest, lengths)
    except WireError as error:
        raise InvalidArgument(f"SubmitMasked stream: {error}") from None
    except ChunkError as error:
        raise DataLoss(f"SubmitMasked stream: {error}") from None
    except ValueError as error:  # the header is not the step's
        raise InvalidArgument(f"SubmitMasked: {error}") from None


def step_payloads(active: Collection[int], inboxes: Mapping[int, bytes], sketch: bytes | None) -> dict[tuple[int, int], Payload]:
    """What each active client of a MASK step fetches, by (client index, kind): its own inbox in
    stage 1, Q (one copy shared by all) in stage 2 of a sketched round."""
    payloads = {(i, INBOX_KIND): _payload(INBOX_KIND, inboxes.get(i, b"")) for i in active if i in inboxes}
    if sketch is not None:
        shared = _payload(SKETCH_KIND, sketch)
        payloads.update({(i, SKETCH_KIND): shared for i in active})
    return payloads


def _payload(kind: int, data: bytes) -> Payload:
    return data, download_of(kind, data)


def payload_chunks(payload: Payload | None, request: sa.FetchSecureRequest, chunk_size: int) -> Iterator[transfer_pb2.Chunk]:
    """FetchSecure's chunks of ``payload`` from the request's offset, checked first."""
    if payload is None:
        name = KIND_NAMES.get(request.kind, request.kind)
        raise InvalidArgument(f"kind: stage {request.stage}'s MASK step has no {name} payload for this client")
    data, announced = payload
    if request.offset > len(data):
        raise OutOfRange(f"offset {request.offset} is beyond the {len(data)}-byte {KIND_NAMES[request.kind]} payload")
    return artifact_chunks(announced.kind, request.round, data, announced.sha256, chunk_size, request.offset)


def inbox_payloads(inboxes: Mapping[int, Sequence[EncryptedShare]]) -> dict[int, bytes]:
    """Each sharer's inbox in MaskStep.inbox's layout."""
    return {i: inbox_bytes(items) for i, items in inboxes.items()}
