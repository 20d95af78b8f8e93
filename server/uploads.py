"""Receiving one SubmitUpdate stream: header checks, the bytes to a temporary file, validation.

The order is the protocol's (protos/PROTOCOL.md, "SubmitUpdate"): the header is checked before a
payload byte is accepted, the pieces go to a temporary file while being hashed, and the payload
is fully validated (names, shapes, rank, dtype, finite values, metadata) before anything is
recorded. Each failure raises the domain refusal that names what was wrong; the temporary file
is removed on every path that does not hand it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from torch import Tensor

from flora.common.chunks import ChunkError, check_sha256, fsync_path
from flora.common.lora import LoraPair, lora_scaling
from flora.common.methods import AggregationMethod, ClientStart
from flora.common.norm_bound import ZERO, Interval, change_norm_sq_ceiling, change_norm_sq_interval
from flora.common.payload import PayloadError, PayloadLimits, check_adapter, open_safetensors
from flora.common.payload_meta import PayloadMeta
from flora.common.robust import change_norm_sq
from flora.common.wire import SUBMIT_UPDATE, Piece, WireError, decode_update_chunk, receive_update
from flora.server.errors import DataLoss, InvalidArgument, ResourceExhausted
from flora.server.preallocation import PreallocatedWriter
from flora.server.store import ClientRecord
from flora.v1 import run_pb2, transfer_pb2

SCALING_RULE_NAMES = {run_pb2.SCALING_RULE_STANDARD: "standard", run_pb2.SCALING_RULE_RSLORA: "rslora"}
# num_examples weights an update (Join and upload header): far beyond any data set, and well inside
# SQLite's signed 64-bit INTEGER, so no claimed count can overflow what stores it.
MAX_NUM_EXAMPLES = 10**12


def check_num_examples(value: int, field: str) -> None:
    """Refuse a count of examples that cannot weight an update (0, or beyond MAX_NUM_EXAMPLES)."""
    if not 1 <= value <= MAX_NUM_EXAMPLES:
        raise InvalidArgument(f"{field} {value} is outside [1, {MAX_NUM_EXAMPLES}] (it weights the update)")


def is_rslora(rule: int) -> bool:
    """Whether a proto ScalingRule value is rsLoRA's alpha / sqrt(r)."""
    return rule == run_pb2.SCALING_RULE_RSLORA


class PieceViews(grpc.aio.ServerInterceptor):
    """SubmitUpdate's requests through ``decode_update_chunk``: pieces reach the upload's file as
    views of the received bytes, not as protobuf's two copies. Innermost of the interceptors, so
    that the others wrap a handler with this codec."""

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != SUBMIT_UPDATE or handler.stream_unary is None:
            return handler
        return grpc.stream_unary_rpc_method_handler(
            handler.stream_unary, request_deserializer=decode_update_chunk, response_serializer=handler.response_serializer)


async def first_message(messages: AsyncIterator[transfer_pb2.UpdateChunk | Piece]) -> transfer_pb2.UpdateHeader:
    """The stream's header, which must be its first message."""
    try:
        first = await anext(messages)
    except StopAsyncIteration:
        raise InvalidArgument("the upload stream is empty; its first message must be the header") from None
    if isinstance(first, Piece) or first.WhichOneof("content") != "header":
        raise InvalidArgument("the first message of an upload must be the header")
    return first.header


def check_header(header: transfer_pb2.UpdateHeader, client: ClientRecord, max_bytes: int) -> None:
    """Refuse a header that contradicts the client's Join or a limit, before reading the payload."""
    if header.rank != client.rank:
        raise InvalidArgument(f"header rank {header.rank} differs from the rank {client.rank} declared at Join")
    if not math.isclose(header.alpha, client.alpha, rel_tol=1e-6):
        raise InvalidArgument(f"header alpha {header.alpha:g} differs from the alpha {client.alpha:g} declared at Join")
    if header.scaling_rule != client.scaling_rule:
        got = SCALING_RULE_NAMES.get(header.scaling_rule, header.scaling_rule)
        joined = SCALING_RULE_NAMES[client.scaling_rule]
        raise InvalidArgument(f"header scaling_rule {got} differs from the rule {joined} declared at Join")
    check_num_examples(header.num_examples, "header num_examples")
    try:
        check_sha256(header.sha256, "header sha256")
    except ChunkError as err:
        raise InvalidArgument(str(err)) from None
    if header.total_bytes > max_bytes:
        raise ResourceExhausted(f"header total_bytes {header.total_bytes} exceeds max_update_bytes {max_bytes}")


async def _replay(
    header: transfer_pb2.UpdateHeader, rest: AsyncIterable[transfer_pb2.UpdateChunk | Piece]
) -> AsyncIterator[transfer_pb2.UpdateChunk | Piece]:
    """The stream as ``receive_update`` expects it, with the already-read header put back in front."""
    yield transfer_pb2.UpdateChunk(header=header)
    async for message in rest:
        yield message


async def receive_payload(
    header: transfer_pb2.UpdateHeader, rest: AsyncIterable[transfer_pb2.UpdateChunk | Piece], tmp_dir: Path, max_bytes: int
) -> Path:
    """Stream the pieces after ``header`` into a new temporary file, verified (sha256) and flushed.

    Not yet fsynced: ``validate_durably`` overlaps the fsync with the validation's read passes.
    A call ended meanwhile (cancelled, past its deadline, an oversized message) cancels this at
    whatever it awaits, the file's creation in a worker thread included: the file is removed
    once that thread is done with it (``_discard``), not by an await a second cancel could cut.
    """
    # Creating, allocating, closing and removing a file wait on the folder (other uploads' renames)
    # and on the filesystem's journal (every upload's fsync): off the loop.
    path = tmp_dir / f"upload-{secrets.token_hex(8)}.part"
    creating = asyncio.ensure_future(asyncio.to_thread(_create_upload_file, path, header.total_bytes))
    try:
        sink = await asyncio.shield(creating)  # a cancel must not lose the file being created
        try:
            await receive_update(_replay(header, rest), sink, max_bytes)
        except WireError as err:
            raise InvalidArgument(f"upload stream: {err}") from None
        except ChunkError as err:
            raise DataLoss(f"upload stream: {err}") from None
        finally:
            await asyncio.to_thread(sink.close)  # flushes: the bytes are in the OS's cache
    except BaseException:
        creating.add_done_callback(lambda created: _discard(created, path))
        raise
    return path


def _discard(created: asyncio.Future, path: Path) -> None:
    """Close and remove an abandoned upload's file in a worker thread, once it has been created."""
    sink = None if created.cancelled() or created.exception() is not None else created.result()
    asyncio.get_running_loop().run_in_executor(None, _close_and_remove, sink, path)


def _close_and_remove(sink: PreallocatedWriter | None, path: Path) -> None:
    if sink is not None:
        with contextlib.suppress(OSError, ValueError):  # closed already, or its flush met a full disk
            sink.close()
    path.unlink(missing_ok=True)


def _create_upload_file(path: Path, total_bytes: int) -> PreallocatedWriter:
    """A new temporary upload file with its first window allocated: a payload of up to one window
    (every small update) makes no allocation call on the event loop, where its pieces are written."""
    sink = PreallocatedWriter(open(path, "wb"), total_bytes)  # noqa: SIM115 - receive_payload closes it
    try:
        sink.reserve()
    except BaseException:
        sink.close()
        path.unlink(missing_ok=True)
        raise
    return sink


async def validate_durably(
    path: Path, header: transfer_pb2.UpdateHeader, shapes: Mapping[str, tuple[int, int]], limits: PayloadLimits,
    max_norm: float, method: AggregationMethod, start: ClientStart,
) -> None:
    """``validate_payload`` in one worker thread while another fsyncs the file: the OS writes the
    bytes back while validation reads them from its cache, so the two costs overlap instead of
    adding up. A validation refusal wins over an fsync error; either leaves the file unpublished.
    """
    synced, checked = await asyncio.gather(
        asyncio.to_thread(fsync_path, path),
        asyncio.to_thread(validate_payload, path, header, shapes, limits, max_norm, method, start),
        return_exceptions=True,
    )
    for outcome in (checked, synced):
        if isinstance(outcome, BaseException):
            raise outcome


def validate_payload(
    path: Path, header: transfer_pb2.UpdateHeader, shapes: Mapping[str, tuple[int, int]], limits: PayloadLimits,
    max_norm: float, method: AggregationMethod, start: ClientStart,
) -> None:
    """Check the payload fully (blocking: run it in a thread) against the header and the model.

    The file is read in pieces, not loaded: an upload costs the server a chunk of memory, not
    its size, until the round is aggregated. The tensors are the run's ``method``'s: A and B,
    or B alone when A is frozen (then A is ``start.init``'s, the leading rows of the global
    LoRA the server keeps). The norm of the update's change from the client's start,
    |s B A - s0 B0 A0|_F (``start.init``; |s B A|_F from a fresh start), must be at most
    ``max_norm``: finite factors can still have a product that overflows a merge.
    """
    try:
        meta = check_adapter(path, shapes, rank=header.rank, limits=limits, with_a=start.train_a)
        _check_metadata(meta, header)
        scaling = lora_scaling(header.rank, header.alpha, is_rslora(header.scaling_rule))
        check_change_norm(path, shapes, scaling, start, max_norm)
    except PayloadError as err:
        raise InvalidArgument(f"payload: {err} (run method {method.name})") from None


def _check_metadata(meta: PayloadMeta, header: transfer_pb2.UpdateHeader) -> None:
    """The payload's metadata says what its header says (a client update of that round, alpha and rule)."""
    if meta.kind != "client_update":
        raise PayloadError(f"metadata 'kind' is {meta.kind!r}, expected 'client_update'")
    if not math.isclose(meta.alpha, header.alpha, rel_tol=1e-6):
        raise PayloadError(f"metadata 'alpha' {meta.alpha:g} differs from the header's {header.alpha:g}")
    if meta.scaling_rule != SCALING_RULE_NAMES[header.scaling_rule]:
        raise PayloadError(f"metadata 'scaling_rule' {meta.scaling_rule} differs from the header's")
    if meta.round is None:
        raise PayloadError(f"metadata 'round' is missing (a client update names its round, here {header.round})")
    if meta.round != header.round:
        raise PayloadError(f"metadata 'round' {meta.round} differs from the header's round {header.round}")


def check_change_norm(
    path: Path, shapes: Mapping[str, tuple[int, int]], scaling: float, start: ClientStart, limit: float
) -> None:
    """Refuse an update whose change norm exceeds ``limit``, with the cheapest proof that decides
    (``flora.common.norm_bound``): the factors' sums of squares (the usual case, far below the
    limit), else the interval from float32 products, else the exact float64 norm, which every
    refusal names."""
    squared_limit = limit * limit
    ceiling = sum(change_norm_sq_ceiling(a, b, scaling, origin, origin_scaling)
                  for a, b, origin, origin_scaling in _module_factors(path, shapes, start))
    if ceiling <= squared_limit:
        return
    interval = _products_interval(path, shapes, scaling, start)
    if interval is not None and interval.high <= squared_limit:
        return
    norm = file_change_norm(path, shapes, scaling, start)
    if not norm <= limit:
        raise PayloadError(
            f"the update's norm (of its change from the round's start) |s B A - s0 B0 A0|_F = {norm:.6g} "
            f"exceeds max_update_norm {limit:.6g}"
        )


def _products_interval(
    path: Path, shapes: Mapping[str, tuple[int, int]], scaling: float, start: ClientStart
) -> Interval | None:
    """The squared norm's interval over all modules from float32 products, or None where one
    module's products overflow."""
    total = ZERO
    for a, b, origin, origin_scaling in _module_factors(path, shapes, start):
        interval = change_norm_sq_interval(a, b, scaling, origin, origin_scaling)
        if interval is None:
            return None
        total += interval
    return total


def file_change_norm(path: Path, shapes: Mapping[str, tuple[int, int]], scaling: float, start: ClientStart) -> float:
    """|s B A - s0 B0 A0|_F over all modules of a validated update file, in float64, against the
    client's ``start.init`` (none: |s B A|_F)."""
    return math.sqrt(sum(change_norm_sq(a, b, scaling, origin, origin_scaling)
                         for a, b, origin, origin_scaling in _module_factors(path, shapes, start)))


def _module_factors(
    path: Path, shapes: Mapping[str, tuple[int, int]], start: ClientStart
) -> Iterator[tuple[Tensor, Tensor, LoraPair | None, float]]:
    """(A, B, the start's pair or None, its scaling) per module of an update file, one module in
    memory at a time; A is the init's when the method freezes it (the file holds B alone)."""
    init = start.init
    with open_safetensors(path) as file:
        for module in sorted(shapes):
            a = file.get_tensor(f"{module}.lora_A") if start.train_a else init.pairs[module].a
            origin, origin_scaling = (None, 1.0) if init is None else (init.pairs[module], init.scaling)
            yield a, file.get_tensor(f"{module}.lora_B"), origin, origin_scaling


def finite_or_none(value: float | None) -> float | None:
    """A reported loss for the history: non-finite values are recorded as unknown."""
    return value if value is not None and math.isfinite(value) else None
