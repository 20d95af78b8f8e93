"""Wire: payloads through real flora.v1 messages (serialized and parsed back) and both receivers."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.common.chunks import ChunkError
from flora.common.wire import (
    Artifact,
    ArtifactReceiver,
    UpdateReceiver,
    WireError,
    Piece,
    artifact_chunks,
    decode_update_chunk,
    encode_piece,
    encoded_update_messages,
    part_path,
    receive_artifacts,
    receive_update,
    resume_offset,
    update_messages,
)
from flora.v1 import run_pb2, transfer_pb2

ADAPTER = transfer_pb2.ARTIFACT_KIND_GLOBAL_ADAPTER
MERGED = transfer_pb2.ARTIFACT_KIND_MERGED_MODULES
PAYLOADS = {v: os.urandom(3000 + 517 * v) for v in (1, 2, 3)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def over_the_wire(messages: Iterable, cls) -> list:
    """What a peer sees: every message serialized and parsed back."""
    return [cls.FromString(m.SerializeToString()) for m in messages]


async def aiter_of(messages: Iterable, fail_after: int | None = None) -> AsyncIterator:
    for i, message in enumerate(messages):
        if i == fail_after:
            raise ConnectionError("stream broken")
        yield message


def make_header(data: bytes, **kw) -> transfer_pb2.UpdateHeader:
    fields = dict(round=3, rank=8, alpha=16.0, scaling_rule=run_pb2.SCALING_RULE_RSLORA, num_examples=120,
                  total_bytes=len(data), sha256=sha(data), base_version=2, train_loss=1.25,
                  validation_loss=1.5, steps=40, train_seconds=2.5)
    return transfer_pb2.UpdateHeader(**{**fields, **kw})


def stream(versions=(1, 2, 3), kind=ADAPTER, chunk_size=1000, offset=0) -> list[transfer_pb2.Chunk]:
    messages = []
    for i, v in enumerate(versions):
        messages += artifact_chunks(kind, v, PAYLOADS[v], sha(PAYLOADS[v]), chunk_size, offset if i == 0 else 0)
    return over_the_wire(messages, transfer_pb2.Chunk)


def path_for(root: Path):
    return lambda kind, version: root / f"kind{kind}-v{version}.safetensors"


# --- download direction -----------------------------------------------------------------------


def test_artifact_chunks_carry_every_field(tmp_path):
    path = tmp_path / "g"
    path.write_bytes(PAYLOADS[2])
    for source in (PAYLOADS[2], path):
        messages = artifact_chunks(ADAPTER, 2, source, sha(PAYLOADS[2]), 1024, offset=10)
        chunks = over_the_wire(messages, transfer_pb2.Chunk)
        assert [c.offset for c in chunks] == [10, 1034, 2058, 3082]
        assert all((c.kind, c.version, c.total_bytes, c.sha256) == (ADAPTER, 2, 4034, sha(PAYLOADS[2])) for c in chunks)
        assert b"".join(c.data for c in chunks) == PAYLOADS[2][10:]


def test_artifact_chunks_refuse_a_bad_sha():
    with pytest.raises(ChunkError, match="sha256 must be 64 lowercase hex digits"):
        next(artifact_chunks(ADAPTER, 1, b"x", "ABC", 10))


def test_several_versions_land_in_verified_files(tmp_path):
    artifacts = asyncio.run(receive_artifacts(aiter_of(stream()), path_for(tmp_path), max_bytes=1 << 20))
    paths = {v: tmp_path / f"kind1-v{v}.safetensors" for v in (1, 2, 3)}
    assert artifacts == [Artifact(ADAPTER, v, paths[v], sha(PAYLOADS[v])) for v in (1, 2, 3)]
    assert all(a.path.read_bytes() == PAYLOADS[a.version] for a in artifacts)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"kind1-v{v}.safetensors" for v in (1, 2, 3)]


def test_empty_stream_receives_nothing(tmp_path):
    assert asyncio.run(receive_artifacts(aiter_of([]), path_for(tmp_path), 100)) == []


def test_broken_stream_keeps_the_part_and_resumes(tmp_path):
    messages = stream()
    with pytest.raises(ConnectionError):
        asyncio.run(receive_artifacts(aiter_of(messages, fail_after=6), path_for(tmp_path), 1 << 20))
    # Version 1 (4 chunks) is final; version 2 is staged with the 2 chunks that arrived.
    final2 = tmp_path / "kind1-v2.safetensors"
    assert (tmp_path / "kind1-v1.safetensors").read_bytes() == PAYLOADS[1]
    assert not final2.exists() and resume_offset(final2) == 2000
    resumed = stream(versions=(2, 3), offset=resume_offset(final2))
    assert resumed[0].offset == 2000
    artifacts = asyncio.run(receive_artifacts(aiter_of(resumed), path_for(tmp_path), 1 << 20))
    assert [a.version for a in artifacts] == [2, 3]
    assert final2.read_bytes() == PAYLOADS[2] and not part_path(final2).exists()


def test_resume_at_the_very_end(tmp_path):
    final = tmp_path / "kind3-v5.safetensors"
    part_path(final).write_bytes(PAYLOADS[1])
    messages = list(artifact_chunks(MERGED, 5, PAYLOADS[1], sha(PAYLOADS[1]), 1000, offset=len(PAYLOADS[1])))
    assert [(m.offset, m.data) for m in messages] == [(len(PAYLOADS[1]), b"")]
    with ArtifactReceiver(path_for(tmp_path), 1 << 20) as receiver:
        receiver.feed(messages[0])
        assert receiver.finish()[0].path == final
    assert final.read_bytes() == PAYLOADS[1]


def test_corrupt_download_deletes_the_part_and_publishes_nothing(tmp_path):
    messages = stream(versions=(1,))
    messages[2].data = bytes([messages[2].data[0] ^ 0xFF]) + messages[2].data[1:]  # a changed byte, whatever it was
    with pytest.raises(ChunkError, match="sha256 mismatch"):
        asyncio.run(receive_artifacts(aiter_of(messages), path_for(tmp_path), 1 << 20))
    assert list(tmp_path.iterdir()) == []


def test_truncated_download_keeps_the_part(tmp_path):
    with pytest.raises(ChunkError, match="stream truncated: received 3000 of total_bytes=3517"):
        asyncio.run(receive_artifacts(aiter_of(stream(versions=(1,))[:-1]), path_for(tmp_path), 1 << 20))
    assert [p.name for p in tmp_path.iterdir()] == ["kind1-v1.safetensors.part"]


def test_resume_offset_must_match_the_part_on_disk(tmp_path):
    part_path(tmp_path / "kind1-v1.safetensors").write_bytes(PAYLOADS[1][:500])
    with pytest.raises(ChunkError, match="chunk at offset 1000 leaves a gap: expected offset 500"):
        asyncio.run(receive_artifacts(aiter_of(stream(versions=(1,), offset=1000)), path_for(tmp_path), 1 << 20))


def test_a_part_longer_than_the_artifact_is_deleted(tmp_path):
    final = tmp_path / "kind1-v1.safetensors"
    part_path(final).write_bytes(PAYLOADS[1] + b"extra")
    messages = stream(versions=(1,))
    messages[0].offset = len(PAYLOADS[1]) + 5
    with pytest.raises(ChunkError, match="3522 bytes already received exceed total_bytes=3517"):
        asyncio.run(receive_artifacts(aiter_of(messages), path_for(tmp_path), 1 << 20))
    assert list(tmp_path.iterdir()) == []


def test_only_the_first_artifact_may_start_at_an_offset(tmp_path):
    messages = stream(versions=(1,)) + stream(versions=(2,), offset=1000)
    with ArtifactReceiver(path_for(tmp_path), 1 << 20) as receiver:
        with pytest.raises(ChunkError, match="chunk at offset 1000 leaves a gap: expected offset 0"):
            for m in messages:
                receiver.feed(m)
    assert (tmp_path / "kind1-v1.safetensors").read_bytes() == PAYLOADS[1]  # published when version 2 began


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda ms: ms.pop(5), "chunk at offset 2000 leaves a gap: expected offset 1000"),
        (lambda ms: ms.extend(stream(versions=(1,))), "version 1 follows version 3; versions must increase"),
        (lambda ms: ms.extend(stream(versions=(3,), kind=MERGED)), "kind 3 differs from the stream's kind 1"),
        (lambda ms: setattr(ms[1], "total_bytes", 9999), "changes total_bytes/sha256 from 3517/.* to 9999/"),
        (lambda ms: setattr(ms[1], "sha256", "0" * 64), "changes total_bytes/sha256"),
        (lambda ms: [setattr(m, "kind", 0) for m in ms], "artifact kind is unspecified"),
    ],
)
def test_download_protocol_violations(mutate, match, tmp_path):
    messages = stream()
    mutate(messages)
    with ArtifactReceiver(path_for(tmp_path), 1 << 20) as receiver, pytest.raises(ChunkError, match=match):
        for m in messages:
            receiver.feed(m)
        receiver.finish()


def test_download_over_max_bytes(tmp_path):
    with pytest.raises(ChunkError, match="total_bytes is 3517; the limit is 3000"):
        asyncio.run(receive_artifacts(aiter_of(stream(versions=(1,))), path_for(tmp_path), 3000))
    assert list(tmp_path.iterdir()) == []


# --- upload direction -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=4000), chunk_size=st.integers(1, 900))
def test_upload_round_trips_through_real_messages(data, chunk_size):
    header = make_header(data)
    messages = over_the_wire(update_messages(header, data, chunk_size), transfer_pb2.UpdateChunk)
    assert messages[0].WhichOneof("content") == "header"
    assert all(m.WhichOneof("content") == "piece" for m in messages[1:])
    sink = io.BytesIO()
    got = asyncio.run(receive_update(aiter_of(messages), sink, max_bytes=1 << 20))
    assert got == header and got.HasField("validation_loss") and got.alpha == 16.0
    assert sink.getvalue() == data


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=4000), chunk_size=st.integers(1, 900))
def test_upload_round_trips_through_the_servers_decoder(data, chunk_size):
    header = make_header(data)
    messages = [decode_update_chunk(m) for m in encoded_update_messages(header, data, chunk_size)]
    assert all(isinstance(m, Piece) for m in messages[1:])  # no piece went through protobuf's copies
    sink = io.BytesIO()
    assert asyncio.run(receive_update(aiter_of(messages), sink, max_bytes=1 << 20)) == header
    assert sink.getvalue() == data


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 2**35, 2**64 - 1])
@pytest.mark.parametrize("size", [0, 1, 128, 70000])
def test_a_piece_decodes_as_a_view_of_the_received_bytes(offset, size):
    data = os.urandom(size)
    piece = decode_update_chunk(encode_piece(offset, data))
    assert isinstance(piece, Piece) and piece.offset == offset and bytes(piece.data) == data
    assert size == 0 or isinstance(piece.data, memoryview)


def test_every_other_layout_is_left_to_protobuf():
    """Valid messages that are not encode_piece's layout parse as protobuf parses them; malformed
    ones fail as protobuf fails."""
    header = transfer_pb2.UpdateChunk(header=make_header(b"abc"))
    assert decode_update_chunk(header.SerializeToString()) == header
    data_first = b"\x12\x07" + b"\x12\x03abc" + b"\x08\x05"  # data, then offset: valid, another order
    extra_field = encode_piece(5, b"abc")[:1] + b"\x09" + encode_piece(5, b"abc")[2:] + b"\x18\x01"  # unknown field 3
    for raw in (data_first, extra_field):
        parsed = decode_update_chunk(raw)
        assert isinstance(parsed, transfer_pb2.UpdateChunk) and (parsed.piece.offset, parsed.piece.data) == (5, b"abc")
    for malformed in (encode_piece(5, b"abc")[:-1], encode_piece(5, b"abc") + b"\x80", b"\x12\xff\xff"):
        with pytest.raises(DecodeError):
            decode_update_chunk(malformed)


@settings(max_examples=300, deadline=None)
@given(offset=st.integers(0, 2**64 - 1), data=st.binary(max_size=300), at=st.integers(0, 400), byte=st.integers(0, 255),
       cut=st.integers(0, 3), tail=st.binary(max_size=3))
def test_a_view_is_only_ever_what_protobuf_would_parse(offset, data, at, byte, cut, tail):
    """Whatever the bytes (a piece with one byte changed, cut short or extended), a Piece comes
    back only where protobuf parses the same piece."""
    raw = bytearray(encode_piece(offset, data))
    raw[at % len(raw)] = byte
    raw = bytes(raw[: len(raw) - cut]) + tail
    try:
        decoded = decode_update_chunk(raw)
    except DecodeError:
        return
    if isinstance(decoded, Piece):
        parsed = transfer_pb2.UpdateChunk.FromString(raw)
        assert parsed.WhichOneof("content") == "piece"
        assert (parsed.piece.offset, parsed.piece.data) == (decoded.offset, bytes(decoded.data))


def test_upload_with_pieces_on_both_sides_of_the_inline_size_arrives_in_order():
    data = bytes(range(256)) * 772  # 197,632 bytes: two pieces of 96 KiB (in a thread), a 1 KiB tail (inline)
    messages = update_messages(make_header(data), data, 96 << 10)
    assert upload(list(messages), max_bytes=1 << 20) == data


def test_upload_from_a_file(tmp_path):
    path = tmp_path / "u.safetensors"
    path.write_bytes(PAYLOADS[3])
    sink = io.BytesIO()
    receiver = UpdateReceiver(sink, 1 << 20)
    for message in update_messages(make_header(PAYLOADS[3]), path, 1000):
        receiver.feed(message)
    assert receiver.finish().total_bytes == len(PAYLOADS[3])
    assert sink.getvalue() == PAYLOADS[3]


def test_update_messages_checks_the_header_against_the_payload():
    for messages in (update_messages, encoded_update_messages):
        with pytest.raises(WireError, match="header total_bytes=5 but the payload is 3 bytes"):
            next(messages(make_header(b"abc", total_bytes=5), b"abc", 10))


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=4000), chunk_size=st.integers(1, 900))
def test_encoded_update_messages_are_the_serialised_update_messages(data, chunk_size):
    """Byte for byte what protobuf makes of update_messages (offsets past one varint byte, empty
    payloads, a short last piece), so a server cannot tell the two apart; ``sent`` is told each
    piece's payload bytes."""
    sent = []
    encoded = list(encoded_update_messages(make_header(data), data, chunk_size, sent.append))
    assert encoded == [m.SerializeToString() for m in update_messages(make_header(data), data, chunk_size)]
    pieces = [min(chunk_size, len(data) - offset) for offset in range(0, len(data), chunk_size)]
    assert sent == (pieces or [0])  # an empty payload is one empty piece


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 16383, 16384, 2**35, 2**64 - 1])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 70000])
def test_an_encoded_piece_is_the_serialised_piece(offset, size):
    data = os.urandom(size)
    message = transfer_pb2.UpdateChunk(piece=transfer_pb2.UpdatePiece(offset=offset, data=data))
    assert encode_piece(offset, data) == message.SerializeToString()


def upload(messages, max_bytes=1 << 20) -> bytes:
    sink = io.BytesIO()
    asyncio.run(receive_update(aiter_of(over_the_wire(messages, transfer_pb2.UpdateChunk)), sink, max_bytes))
    return sink.getvalue()


def msgs(data: bytes = PAYLOADS[1], **header_fields) -> list[transfer_pb2.UpdateChunk]:
    return list(update_messages(make_header(data, **header_fields), data, 1000))


def test_upload_rejections():
    with pytest.raises(WireError, match="ended before its header"):
        upload([])
    with pytest.raises(WireError, match="message 1 is a piece before the header"):
        upload(msgs()[1:])
    with pytest.raises(WireError, match="message 3 is a second header"):
        upload([*msgs()[:2], msgs()[0], *msgs()[2:]])
    with pytest.raises(WireError, match="message 2 holds neither a header nor a piece"):
        upload([msgs()[0], transfer_pb2.UpdateChunk()])
    with pytest.raises(ChunkError, match="total_bytes is 3517; the limit is 3516"):
        upload(msgs(), max_bytes=3516)


def test_upload_header_sha_must_be_lowercase_hex():
    bad = msgs()
    bad[0].header.sha256 = bad[0].header.sha256.upper()
    with pytest.raises(ChunkError, match="sha256 must be 64 lowercase hex digits"):
        upload(bad)


def test_upload_corrupted_truncated_or_reordered():
    corrupt = msgs()
    corrupt[2].piece.data = corrupt[2].piece.data[::-1]
    with pytest.raises(ChunkError, match="sha256 mismatch"):
        upload(corrupt)
    with pytest.raises(ChunkError, match="stream truncated: received 3000 of total_bytes=3517"):
        upload(msgs()[:-1])
    swapped = msgs()
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(ChunkError, match="chunk at offset 1000 leaves a gap: expected offset 0"):
        upload(swapped)
