"""Fuzzing the parsers that read untrusted bytes: nothing but our own refusal types may escape.

Targets: the safetensors header parser, the full payload validator (on mutations of valid
payloads and on structured hostile headers) and the chunk reassembler. Hypothesis shrinks any
crash to a minimal input. The example budget is the "fuzz" profile's: about a minute in all on
CI; set FLORA_FUZZ_EXAMPLES (e.g. 100000) to fuzz longer by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flora.common.chunks import ChunkError, ChunkReceiver
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.payload import PayloadError, PayloadLimits, PayloadMeta, check_adapter, encode_adapter, read_adapter
from flora.common.payload_header import read_header
from flora.common.wire import UpdateReceiver
from flora.v1 import transfer_pb2

EXAMPLES = int(os.environ.get("FLORA_FUZZ_EXAMPLES", "600"))
settings.register_profile("fuzz", max_examples=EXAMPLES, deadline=None, derandomize="FLORA_FUZZ_EXAMPLES" not in os.environ,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings.get_profile("fuzz")

SHAPES = {"m.q": (3, 4), "m.v": (2, 4)}
LIMITS = PayloadLimits(max_bytes=1 << 16, max_header_bytes=1 << 12, max_rank=8)


def _valid(rank: int = 2) -> bytes:
    gen = torch.Generator().manual_seed(rank)
    pairs = {n: LoraPair(torch.randn(rank, i, generator=gen), torch.randn(o, rank, generator=gen)) for n, (o, i) in SHAPES.items()}
    meta = PayloadMeta("client_update", rank=rank, alpha=4.0, scaling_rule="standard", round=1)
    return encode_adapter(LoraAdapter(pairs, 4.0 / rank), meta)


VALID = _valid()
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
                     max_leaves=12)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for every example's payload file (a new folder per example costs more than the check)."""
    return tmp_path_factory.mktemp("fuzz")


def _framed(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _validate(payload: bytes, tmp: Path) -> None:
    """Every reader an upload meets; only PayloadError may come out."""
    try:
        read_adapter(payload, SHAPES, rank=2, limits=LIMITS)
    except PayloadError:
        pass
    path = tmp / "payload.safetensors"
    path.write_bytes(payload)
    try:
        check_adapter(path, SHAPES, rank=2, limits=LIMITS)
    except PayloadError:
        pass


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_get_a_payload_error(data):
    try:
        read_header(data, LIMITS)
    except PayloadError:
        pass


@FUZZ
@given(st.dictionaries(st.text(max_size=24), _JSON, max_size=6), st.binary(max_size=128))
def test_hostile_json_headers_only_ever_get_a_payload_error(scratch, header, data):
    _validate(_framed(json.dumps(header).encode(), data), scratch)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_mutated_valid_payloads_only_ever_get_a_payload_error(scratch, flips, cut):
    payload = bytearray(VALID)
    for position, value in flips:
        payload[position] = value
    _validate(bytes(payload[:cut] if cut < len(VALID) // 2 else payload), scratch)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 80), st.binary(max_size=40)), max_size=8), st.binary(max_size=64),
       st.integers(0, 100))
def test_the_chunk_reassembler_accepts_exactly_the_announced_payload(pieces, payload, announced):
    sink = io.BytesIO()
    receiver = ChunkReceiver(sink, len(payload), hashlib.sha256(payload).hexdigest(), max_bytes=announced + 64)
    try:
        for offset, data in pieces:
            receiver.add(offset, data)
        receiver.finish()
    except ChunkError:
        return
    assert sink.getvalue() == payload  # accepted means: exactly the announced bytes


@FUZZ
@given(st.lists(st.one_of(
    st.builds(lambda n, s: transfer_pb2.UpdateChunk(header=transfer_pb2.UpdateHeader(total_bytes=n, sha256=s)),
              st.integers(0, 2**64 - 1), st.sampled_from(["", "x" * 64, hashlib.sha256(b"ab").hexdigest()])),
    st.builds(lambda o, d: transfer_pb2.UpdateChunk(piece=transfer_pb2.UpdatePiece(offset=o, data=d)),
              st.integers(0, 2**64 - 1) | st.integers(0, 4), st.binary(max_size=4)),
    st.just(transfer_pb2.UpdateChunk())), max_size=6))
def test_an_upload_stream_only_ever_gets_a_chunk_error(messages):
    receiver = UpdateReceiver(io.BytesIO(), max_bytes=1 << 20)
    try:
        for message in messages:
            receiver.feed(message)
        receiver.finish()
    except ChunkError:  # WireError is a ChunkError
        pass
