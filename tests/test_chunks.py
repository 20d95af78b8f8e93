"""Chunking: any payload round-trips, and every malformed chunk stream is refused by offset/size."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.common.chunks import (
    DEFAULT_CHUNK_SIZE,
    ChunkError,
    ChunkReceiver,
    check_sha256,
    file_sha256,
    iter_chunks,
    open_partial,
    publish,
)

PAYLOAD = os.urandom(10_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def receive(chunks, total=len(PAYLOAD), sha=SHA, max_bytes=1 << 20) -> bytes:
    sink = io.BytesIO()
    receiver = ChunkReceiver(sink, total, sha, max_bytes)
    for offset, data in chunks:
        receiver.add(offset, data)
    receiver.finish()
    return sink.getvalue()


def test_default_chunk_size_is_one_mebibyte():
    assert DEFAULT_CHUNK_SIZE == 1 << 20


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(max_size=5000),
    chunk_size=st.integers(1, 700),
    kind=st.sampled_from(["bytes", "view", "file"]),
)
def test_any_payload_round_trips(payload, chunk_size, kind, tmp_path_factory):
    if kind == "file":
        source = tmp_path_factory.mktemp("c") / "payload"
        source.write_bytes(payload)
    else:
        source = memoryview(payload) if kind == "view" else payload
    chunks = list(iter_chunks(source, chunk_size))
    assert [off for off, _ in chunks] == [sum(len(d) for _, d in chunks[:i]) for i in range(len(chunks))]
    assert all(0 < len(d) <= chunk_size for _, d in chunks) or payload == b""
    assert receive(chunks, len(payload), hashlib.sha256(payload).hexdigest()) == payload


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_resume_from_any_offset_round_trips(data, tmp_path_factory):
    payload = data.draw(st.binary(min_size=1, max_size=3000))
    offset = data.draw(st.integers(0, len(payload)))
    chunk_size = data.draw(st.integers(1, 500))
    part = tmp_path_factory.mktemp("r") / "payload.part"
    part.write_bytes(payload[:offset])
    sink, prefix = open_partial(part)
    with sink:
        assert prefix.size == offset
        receiver = ChunkReceiver(sink, len(payload), hashlib.sha256(payload).hexdigest(), 1 << 20, prefix=prefix)
        for off, chunk in iter_chunks(payload, chunk_size, offset):
            receiver.add(off, chunk)
        receiver.finish()
    assert part.read_bytes() == payload


def test_empty_payload_is_one_empty_chunk():
    assert list(iter_chunks(b"", 8)) == [(0, b"")]
    assert list(iter_chunks(b"abc", 8, offset=3)) == [(3, b"")]
    assert receive([(0, b"")], 0, hashlib.sha256(b"").hexdigest()) == b""


def test_file_is_read_in_bounded_chunks(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(PAYLOAD)
    chunks = list(iter_chunks(path, 4096, offset=100))
    assert [len(d) for _, d in chunks] == [4096, 4096, 10_000 - 100 - 8192]
    assert b"".join(d for _, d in chunks) == PAYLOAD[100:]


def test_file_read_stops_at_the_size_it_started_with(tmp_path):
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 10)
    chunks = iter_chunks(path, 4)
    first = next(chunks)
    with open(path, "ab") as f:
        f.write(b"y" * 100)
    assert b"".join([first[1], *(d for _, d in chunks)]) == b"x" * 10


@pytest.mark.parametrize(
    ("chunk_size", "offset", "match"),
    [
        (0, 0, "chunk_size must be > 0"),
        (8, -1, "offset -1"),
        (8, 10_001, "offset 10001 is outside the 10000-byte payload"),
    ],
)
def test_iter_chunks_validates_arguments(chunk_size, offset, match):
    with pytest.raises(ChunkError, match=match):
        list(iter_chunks(PAYLOAD, chunk_size, offset))


def test_file_sha256_streams(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD * 300)
    assert file_sha256(path) == hashlib.sha256(PAYLOAD * 300).hexdigest()


def chunked(size: int = 1000):
    return list(iter_chunks(PAYLOAD, size))


def test_flipped_byte_is_a_sha_mismatch():
    chunks = chunked()
    off, data = chunks[3]
    chunks[3] = (off, data[:7] + bytes([data[7] ^ 1]) + data[8:])
    with pytest.raises(ChunkError, match=f"sha256 mismatch over 10000 bytes: got [0-9a-f]{{64}}, expected {SHA}"):
        receive(chunks)


def test_truncated_stream():
    with pytest.raises(ChunkError, match="stream truncated: received 9000 of total_bytes=10000"):
        receive(chunked()[:-1])


def test_reordered_stream_is_a_gap():
    chunks = chunked()
    chunks[2], chunks[3] = chunks[3], chunks[2]
    with pytest.raises(ChunkError, match="chunk at offset 3000 leaves a gap: expected offset 2000"):
        receive(chunks)


def test_duplicated_chunk_is_an_overlap():
    chunks = chunked()
    chunks.insert(4, chunks[3])
    with pytest.raises(ChunkError, match="chunk at offset 3000 overlaps bytes already received: expected offset 4000"):
        receive(chunks)


def test_partly_overlapping_chunk():
    with pytest.raises(ChunkError, match="chunk at offset 500 overlaps"):
        receive([(0, PAYLOAD[:1000]), (500, PAYLOAD[500:])])


def test_chunk_past_total_bytes():
    with pytest.raises(ChunkError, match="chunk at offset 9000 of 1001 bytes runs past total_bytes=10000"):
        receive([*chunked()[:-1], (9000, PAYLOAD[9000:] + b"!")])


def test_total_over_max_is_refused_before_any_chunk():
    with pytest.raises(ChunkError, match="total_bytes is 10000; the limit is 9999"):
        ChunkReceiver(io.BytesIO(), 10_000, SHA, 9_999)


def test_empty_chunk_is_refused_while_bytes_remain():
    with pytest.raises(ChunkError, match="empty chunk at offset 1000 while 9000 bytes remain"):
        receive([(0, PAYLOAD[:1000]), (1000, b"")])
    assert receive([*chunked(), (10_000, b"")]) == PAYLOAD


# Fixed ids: SHA hashes a random payload, and xdist's workers must collect the same test names.
@pytest.mark.parametrize("bad", ["", SHA.upper(), SHA[:-1], SHA + "0", "g" * 64],
                         ids=["empty", "upper", "short", "long", "not-hex"])
def test_sha256_must_be_64_lowercase_hex(bad):
    with pytest.raises(ChunkError, match="sha256 must be 64 lowercase hex digits"):
        ChunkReceiver(io.BytesIO(), 1, bad, 10)
    assert check_sha256(SHA) == SHA


def test_resume_with_corrupt_prefix_fails_the_hash(tmp_path):
    part = tmp_path / "p.part"
    part.write_bytes(b"\x00" * 4000)
    sink, prefix = open_partial(part)
    with sink:
        receiver = ChunkReceiver(sink, len(PAYLOAD), SHA, 1 << 20, prefix=prefix)
        with pytest.raises(ChunkError, match="chunk at offset 3000 overlaps .* expected offset 4000"):
            receiver.add(3000, PAYLOAD[3000:])
        receiver.add(4000, PAYLOAD[4000:])
        with pytest.raises(ChunkError, match="sha256 mismatch"):
            receiver.finish()


def test_resume_prefix_larger_than_total(tmp_path):
    part = tmp_path / "p.part"
    part.write_bytes(b"x" * 20)
    sink, prefix = open_partial(part)
    with sink, pytest.raises(ChunkError, match="20 bytes already received exceed total_bytes=10"):
        ChunkReceiver(sink, 10, SHA, 100, prefix=prefix)


def test_open_partial_creates_a_missing_file(tmp_path):
    sink, prefix = open_partial(tmp_path / "new.part")
    with sink:
        assert prefix.size == 0 and prefix.digest.hexdigest() == hashlib.sha256(b"").hexdigest()
    assert (tmp_path / "new.part").exists()


def test_publish_replaces_the_final_file(tmp_path: Path):
    staged, final = tmp_path / "a.part", tmp_path / "a"
    staged.write_bytes(b"new")
    final.write_bytes(b"old")
    publish(staged, final)
    assert final.read_bytes() == b"new" and not staged.exists()
