"""Payloads: exact round-trips, and every way an untrusted safetensors payload is refused."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_bytes

from flora.common import payload as payload_module
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling
from flora.common.payload import (
    PayloadError,
    PayloadLimits,
    PayloadMeta,
    encode_adapter,
    encode_weights,
    check_adapter,
    read_adapter,
    read_weights,
    write_adapter,
    write_weights,
)

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
K = "model.layers.1.self_attn.k_proj"
EXPECTED = {Q: (128, 128), V: (64, 128), K: (32, 96)}


def make_adapter(rank: int = 4, alpha: float = 8.0, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    pairs = {
        m: LoraPair(torch.randn(rank, d_in, generator=gen).to(dtype), torch.randn(d_out, rank, generator=gen).to(dtype))
        for m, (d_out, d_in) in EXPECTED.items()
    }
    return LoraAdapter(pairs, lora_scaling(rank, alpha))


def meta_for(rank: int = 4, alpha: float = 8.0, **kw) -> PayloadMeta:
    return PayloadMeta("client_update", rank=rank, alpha=alpha, scaling_rule="standard", **kw)


def good_payload(rank: int = 4) -> bytes:
    return encode_adapter(make_adapter(rank), meta_for(rank))


def raw_payload(tensors: dict[str, torch.Tensor], rank: int = 4) -> bytes:
    """A real safetensors payload of arbitrary tensors, with valid flora metadata."""
    return save_bytes(tensors, metadata=meta_for(rank).to_metadata())


def adapter_tensors(rank: int = 4) -> dict[str, torch.Tensor]:
    adapter = make_adapter(rank)
    out = {}
    for m, (a, b) in adapter.pairs.items():
        out[f"{m}.lora_A"], out[f"{m}.lora_B"] = a, b
    return out


def split(payload: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def join(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def surgery(edit, payload: bytes | None = None) -> bytes:
    """Real safetensors bytes with the header JSON edited in place (data region untouched)."""
    header, data = split(payload or good_payload())
    edit(header)
    return join(header, data)


def rejects(source, match: str, **kw) -> PayloadError:
    with pytest.raises(PayloadError, match=match) as info:
        read_adapter(source, EXPECTED, **kw)
    if isinstance(source, Path):  # the streaming validator refuses exactly the same files
        with pytest.raises(PayloadError, match=match):
            check_adapter(source, EXPECTED, **kw)
    return info.value


@pytest.fixture(params=["bytes", "file"])
def as_source(request, tmp_path):
    """Run a test once on in-memory bytes and once on a file."""

    def convert(payload: bytes):
        if request.param == "bytes":
            return payload
        path = tmp_path / "p.safetensors"
        path.write_bytes(payload)
        return path

    return convert


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_adapter_round_trip_bytes_and_file(dtype, rank, tmp_path):
    adapter = make_adapter(rank)
    meta = meta_for(rank, alpha=2.0 * rank, round=3, version=2)
    adapter = LoraAdapter(adapter.pairs, meta.scaling)
    data = encode_adapter(adapter, meta, dtype)
    size, sha = write_adapter(tmp_path / "u.safetensors", adapter, meta, dtype)
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    for source in (data, tmp_path / "u.safetensors"):
        got, got_meta = read_adapter(source, EXPECTED, rank=rank)
        assert got_meta == meta
        assert got.scaling == meta.scaling and got.rank == rank
        assert got.module_names == sorted(EXPECTED)
        for m in EXPECTED:
            assert got.pairs[m].a.dtype == dtype
            assert torch.equal(got.pairs[m].a, adapter.pairs[m].a.to(dtype))
            assert torch.equal(got.pairs[m].b, adapter.pairs[m].b.to(dtype))


def test_encoding_is_deterministic(tmp_path):
    """The sha256 is the upload's idempotency key: the same adapter must always hash the same."""
    adapter, meta = make_adapter(), meta_for(round=2, version=1)
    encodings = {encode_adapter(adapter, meta) for _ in range(10)}
    files = {write_adapter(tmp_path / f"{i}.safetensors", adapter, meta)[1] for i in range(5)}
    assert len(encodings) == 1 and files == {hashlib.sha256(encodings.pop()).hexdigest()}
    header, _ = split(encode_adapter(adapter, meta))
    assert list(header["__metadata__"]) == sorted(meta.to_metadata())


def test_encode_keeps_dtype_when_none_given():
    got, _ = read_adapter(encode_adapter(make_adapter(dtype=torch.bfloat16), meta_for()), EXPECTED)
    assert got.pairs[Q].a.dtype == torch.bfloat16


def test_trusted_scaling_wins_and_rslora_metadata(tmp_path):
    meta = PayloadMeta("client_update", rank=4, alpha=8.0, scaling_rule="rslora")
    adapter = LoraAdapter(make_adapter().pairs, lora_scaling(4, 8.0, rslora=True))
    data = encode_adapter(adapter, meta)
    assert read_adapter(data, EXPECTED)[0].scaling == 4.0
    assert read_adapter(data, EXPECTED, scaling=0.25)[0].scaling == 0.25


def test_write_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"old")
    write_adapter(path, make_adapter(), meta_for())
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]
    assert read_adapter(path, EXPECTED)[1] == meta_for()


def test_write_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"old")
    bad = make_adapter()
    bad.pairs[Q].a[0, 0] = math.nan
    with pytest.raises(PayloadError, match=f"{Q}.lora_A"):
        write_adapter(path, bad, meta_for())
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"] and path.read_bytes() == b"old"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_round_trip(dtype, tmp_path):
    weights = {m: torch.randn(shape) for m, shape in EXPECTED.items()}
    meta = PayloadMeta("merged_modules", version=7)
    data = encode_weights(weights, meta, dtype)
    size, sha = write_weights(tmp_path / "w.safetensors", weights, meta, dtype)
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    for source in (data, tmp_path / "w.safetensors"):
        got, got_meta = read_weights(source, EXPECTED)
        assert got_meta == meta and got_meta.format == "flora.weights.v1"
        assert all(torch.equal(got[m], weights[m].to(dtype)) for m in EXPECTED)


def test_weights_shape_and_kind_are_checked():
    weights = {m: torch.randn(shape) for m, shape in EXPECTED.items()}
    weights[K] = torch.randn(32, 95)
    data = encode_weights(weights, PayloadMeta("merged_modules"))
    mismatch = r"shape \(32, 95\) does not match \(out_features, in_features\) = \(32, 96\)"
    with pytest.raises(PayloadError, match=mismatch):
        read_weights(data, EXPECTED)
    with pytest.raises(PayloadError, match="not a merged-weights payload"):
        read_weights(good_payload(), EXPECTED)
    weights[K] = torch.randn(32, 96)
    with pytest.raises(PayloadError, match="not an adapter payload"):
        read_adapter(encode_weights(weights, PayloadMeta("merged_modules")), EXPECTED)


def test_nothing_is_unpickled(monkeypatch, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must never run on a payload")

    monkeypatch.setattr(torch, "load", forbidden)
    write_adapter(tmp_path / "u.safetensors", make_adapter(), meta_for())
    read_adapter(tmp_path / "u.safetensors", EXPECTED)
    read_adapter(good_payload(), EXPECTED)


# --- encoding refusals ------------------------------------------------------------------------


def test_encode_refuses_inconsistent_or_unsendable_input():
    with pytest.raises(PayloadError, match="metadata 'rank': 8 does not match the adapter's rank 4"):
        encode_adapter(make_adapter(4), meta_for(8))
    with pytest.raises(PayloadError, match="metadata 'scaling'"):
        encode_adapter(make_adapter(4, alpha=8.0), meta_for(4, alpha=16.0))
    with pytest.raises(PayloadError, match=f"tensor '{Q}.lora_A': dtype torch.float64 is not allowed"):
        encode_adapter(make_adapter(dtype=torch.float64), meta_for())
    with pytest.raises(PayloadError, match="cannot describe a LoRA adapter"):
        encode_adapter(make_adapter(), PayloadMeta("merged_modules"))


# --- metadata ---------------------------------------------------------------------------------


def test_meta_string_round_trip():
    for written in ("8", "8.", "8.0", ".8e1", "8E+0", "80e-1"):  # decimal floats in every form the doc allows
        text = meta_for().to_metadata()
        text["alpha"] = written
        assert PayloadMeta.from_metadata(text).alpha == 8.0
    stacked = PayloadMeta("global_adapter", rank=12, alpha=12.0, scaling_rule="standard")
    for meta in (meta_for(round=1, version=0), stacked, PayloadMeta("merged_modules", version=3)):
        text = meta.to_metadata()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in text.items())
        assert PayloadMeta.from_metadata(text) == meta
    assert stacked.scaling == 1.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kind": "gradient"}, "metadata 'kind': 'gradient' is not one of"),
        ({"rank": "four"}, "metadata 'rank': 'four' is not a non-negative integer"),
        ({"rank": "-4"}, "metadata 'rank'"),
        ({"rank": "0"}, r"metadata 'rank': 0 is not >= 1"),
        ({"alpha": "x"}, "metadata 'alpha': 'x' is not a decimal number"),
        ({"alpha": "nan"}, "metadata 'alpha': 'nan' is not a decimal number"),
        ({"alpha": "1e999"}, "metadata 'alpha': inf is not finite"),
        ({"alpha": "0_8.0"}, "metadata 'alpha': '0_8.0' is not a decimal number"),  # Python's float() reads these
        ({"alpha": " 8.0"}, "metadata 'alpha': ' 8.0' is not a decimal number"),
        ({"scaling": "2.0\n"}, r"metadata 'scaling': '2.0\\n' is not a decimal number"),
        ({"scaling": "3.0"}, "metadata 'scaling': 3.0 does not follow from rank 4"),
        ({"scaling_rule": "sqrt"}, "metadata 'scaling_rule': 'sqrt' is not one of standard, rslora"),
        ({"format": "flora.lora.v2"}, "metadata 'format': 'flora.lora.v2' is not 'flora.lora.v1'"),
        ({"round": "1.5"}, "metadata 'round'"),
        ({"extra": "1"}, "metadata 'extra' is not a flora.lora.v1 key"),
        ({"alpha": None}, "metadata 'alpha' is missing"),
        ({"scaling": None}, "metadata 'scaling' is missing"),
        ({"kind": None}, "metadata 'kind' is missing"),
    ],
)
def test_meta_rejections_name_the_key(change, match):
    """Every malformed key is refused by name; numbers are decimal floats only (PROTOCOL.md, "Payloads")."""
    text = meta_for().to_metadata()
    for key, value in change.items():
        if value is None:
            del text[key]
        else:
            text[key] = value
    with pytest.raises(PayloadError, match=match):
        PayloadMeta.from_metadata(text)
    rejects(surgery(lambda h: h.__setitem__("__metadata__", text)), match)


def test_meta_for_weights_refuses_adapter_keys():
    with pytest.raises(PayloadError, match="metadata 'rank' is not a flora.weights.v1 key"):
        PayloadMeta.from_metadata({"format": "flora.weights.v1", "kind": "merged_modules", "rank": "4"})
    with pytest.raises(PayloadError, match="metadata 'rank' does not belong"):
        PayloadMeta("merged_modules", rank=4)


# --- header validation ------------------------------------------------------------------------


def test_too_short_and_foreign_bytes(as_source):
    rejects(as_source(b"\x01\x02"), "payload is 2 bytes; a safetensors payload has at least 8")
    rejects(as_source(b"PK\x03\x04" + bytes(60)), r"header is \d+ bytes; the limit is 8388608")


def test_huge_header_length(as_source):
    payload = struct.pack("<Q", 9_000_000) + b"{}"
    rejects(as_source(payload), "header is 9000000 bytes; the limit is 8388608")
    rejects(as_source(good_payload()), "header is .* bytes; the limit is 64", limits=PayloadLimits(max_header_bytes=64))


def test_header_length_past_end():
    rejects(struct.pack("<Q", 100) + b"{}", "header is 100 bytes but only 2 follow the length prefix")


def test_over_max_bytes(as_source):
    payload = good_payload()
    limits = PayloadLimits(max_bytes=1000)
    rejects(as_source(payload), f"payload is {len(payload)} bytes; the limit is 1000", limits=limits)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\xff\xfe{}", "header is not valid UTF-8"),
        (b"{not json", "header is not valid JSON"),
        (b"[1, 2]", "header is a JSON list, not an object"),
        (b"[" * 200_000 + b"]" * 200_000, "header is not valid JSON"),
        (b'{"__metadata__": {}, "__metadata__": {}}', "header repeats the key '__metadata__'"),
        (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', "header '__metadata__' is missing"),
        (b'{"__metadata__": {"rank": 4}}', "metadata 'rank': value 4 is not a string"),
    ],
)
def test_malformed_header(raw, match, as_source):
    rejects(as_source(join(raw, b"")), match)


@pytest.mark.parametrize("dtype", ["I64", "F64", "U8", "bogus"])
def test_disallowed_dtype(dtype):
    def edit(h):
        a = h[f"{Q}.lora_A"]
        a["dtype"] = dtype
        a["shape"] = [a["shape"][0], a["shape"][1] // 2]  # same byte count for 8-byte dtypes

    rejects(surgery(edit), f"tensor '{Q}.lora_A': dtype '{dtype}' is not allowed \\(allowed: BF16, F16, F32\\)")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("shape", "4x128", "shape '4x128' is not a list of non-negative integers"),
        ("shape", [4, -128], "is not a list of non-negative integers"),
        ("shape", [True, 128], "is not a list of non-negative integers"),
        ("shape", [4.0, 128], "is not a list of non-negative integers"),
        ("data_offsets", [0], "data_offsets \\[0\\] is not two non-negative integers"),
        ("data_offsets", [0, 100], r"data_offsets \[0, 100\] hold 100 bytes but shape \(4, 96\) of F32 needs 1536"),
        ("extra", 1, "entry must be an object with exactly"),
    ],
)
def test_malformed_tensor_entry(field, value, match):
    rejects(surgery(lambda h: h[f"{K}.lora_A"].__setitem__(field, value)), match)


def _entries_by_offset(header: dict) -> list[str]:
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])


def test_overlapping_offsets():
    def edit(h):
        first, second = _entries_by_offset(h)[:2]
        h[second]["data_offsets"] = h[first]["data_offsets"]

    rejects(surgery(edit), "overlapping bytes")


def test_gap_and_past_end_offsets():
    def shift(h):
        last = _entries_by_offset(h)[-1]
        start, end = h[last]["data_offsets"]
        h[last]["data_offsets"] = [start + 4, end + 4]

    header, data = split(good_payload())
    rejects(join(header, data[:-4]), "data_offsets end at .*, past the .*-byte data region")
    shift(header)
    rejects(join(header, data + bytes(4)), r"leave a gap of bytes \[\d+, \d+\) after tensor")
    rejects(good_payload() + bytes(8), "the data region is .* bytes but the tensors cover only")


# --- names, shapes, ranks ---------------------------------------------------------------------


def test_unknown_and_missing_tensors_are_named(as_source):
    tensors = adapter_tensors()
    tensors["model.layers.9.mlp.up_proj.lora_A"] = torch.zeros(4, 8)
    rejects(as_source(raw_payload(tensors)), "unexpected tensor 'model.layers.9.mlp.up_proj.lora_A' \\(1 unexpected")
    del tensors["model.layers.9.mlp.up_proj.lora_A"], tensors[f"{V}.lora_B"], tensors[f"{K}.lora_B"]
    rejects(as_source(raw_payload(tensors)), f"missing tensor '{V}.lora_B' \\(2 missing in all\\)")


def test_shape_mismatch_message_is_exact():
    tensors = adapter_tensors()
    tensors[f"{Q}.lora_A"] = torch.zeros(4, 127)
    error = rejects(raw_payload(tensors), "does not match")
    assert str(error).startswith(
        f"tensor '{Q}.lora_A': shape (4, 127) does not match (rank, in_features) = (4, 128)"
    )
    tensors = adapter_tensors()
    tensors[f"{V}.lora_B"] = torch.zeros(63, 4)
    rejects(raw_payload(tensors), rf"'{V}.lora_B': shape \(63, 4\) does not match \(out_features, rank\) = \(64, 4\)")
    tensors[f"{V}.lora_B"] = torch.zeros(64 * 4)
    rejects(raw_payload(tensors), rf"'{V}.lora_B': shape \(256,\) is not 2-D")


def test_inconsistent_ranks():
    tensors = adapter_tensors(4)
    tensors[f"{V}.lora_A"], tensors[f"{V}.lora_B"] = torch.zeros(8, 128), torch.zeros(64, 8)
    rejects(raw_payload(tensors), rf"'{V}.lora_A': shape \(8, 128\) does not match .* \(the rank of '{Q}.lora_A'\)")


def test_declared_rank_and_metadata_rank(as_source):
    declared = rf"'{Q}.lora_A': shape \(4, 128\) does not match \(rank, in_features\) = \(8, 128\) \(the declared rank\)"
    rejects(as_source(good_payload(4)), declared, rank=8)
    rejects(as_source(raw_payload(adapter_tensors(4), rank=5)), "metadata 'rank': 5 does not match the tensors' rank 4")


def test_rank_limit():
    rejects(good_payload(16), r"rank 16 \(the rank of .*\) is outside \[1, 8\]", limits=PayloadLimits(max_rank=8))
    rejects(good_payload(4), r"rank 0 \(the declared rank\) is outside", rank=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_named(bad, as_source):
    tensors = adapter_tensors()
    tensors[f"{V}.lora_B"][3, 1] = bad
    rejects(as_source(raw_payload(tensors)), f"tensor '{V}.lora_B': 1 of 256 values are NaN or infinite")


def test_infinities_of_both_signs_are_counted(as_source):
    tensors = adapter_tensors()
    tensors[f"{V}.lora_B"][0, 0], tensors[f"{V}.lora_B"][1, 0] = math.inf, -math.inf  # their sum is NaN
    rejects(as_source(raw_payload(tensors)), f"tensor '{V}.lora_B': 2 of 256 values are NaN or infinite")


@pytest.mark.parametrize("dtype, big", [(torch.float32, 3e38), (torch.float16, 60000.0)])
def test_finite_values_whose_sum_overflows_are_accepted(dtype, big, tmp_path):
    """The fast check sums the values: an overflowing sum of finite values is counted, not refused."""
    tensors = {n: (torch.ones_like(t) * big).to(dtype) for n, t in adapter_tensors().items()}
    path = tmp_path / "p.safetensors"
    path.write_bytes(raw_payload(tensors))
    read_adapter(path, EXPECTED)
    check_adapter(path, EXPECTED)


def test_bfloat16_nan_detected():
    tensors = {n: t.to(torch.bfloat16) for n, t in adapter_tensors().items()}
    tensors[f"{Q}.lora_A"][0, 0] = math.nan
    rejects(raw_payload(tensors), f"tensor '{Q}.lora_A'")


def test_file_with_trailing_bytes_is_refused(tmp_path: Path):
    """Bytes after the last tensor would be ignored by a lenient reader; they are refused."""
    path = tmp_path / "p.safetensors"
    path.write_bytes(good_payload() + b"junk")
    rejects(path, "the data region is .* bytes but the tensors cover only")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_adapter_reads_in_pieces_and_finds_a_nan_in_any_piece(dtype, tmp_path, monkeypatch):
    monkeypatch.setattr(payload_module, "_CHECK_BLOCK", 100)  # forces many pieces per tensor
    path = tmp_path / "p.safetensors"
    tensors = {n: t.to(dtype) for n, t in adapter_tensors().items()}
    path.write_bytes(raw_payload(tensors))
    assert check_adapter(path, EXPECTED, rank=4) == meta_for()
    tensors[f"{V}.lora_B"][-1, -1] = math.nan  # the very last element of the data region
    path.write_bytes(raw_payload(tensors))
    with pytest.raises(PayloadError, match=f"tensor '{V}.lora_B'"):
        check_adapter(path, EXPECTED)


# --- B-only updates (a method that freezes A: ffa) ----------------------------------------------


def test_a_b_only_update_round_trips_with_the_readers_frozen_a(tmp_path):
    adapter, frozen = make_adapter(4), make_adapter(6, seed=1)  # the reader's A has the global rank 6
    data = encode_adapter(adapter, meta_for(4), with_a=False)
    header, _ = split(data)
    assert sorted(n for n in header if n != "__metadata__") == sorted(f"{m}.lora_B" for m in EXPECTED)
    assert len(data) < 0.6 * len(good_payload(4))  # B alone: the A factors' bytes are not sent
    path = tmp_path / "b.safetensors"
    write_adapter(path, adapter, meta_for(4), with_a=False)
    assert path.read_bytes() == data
    assert check_adapter(path, EXPECTED, rank=4, with_a=False) == meta_for(4)
    loaded, _ = read_adapter(path, EXPECTED, rank=4, frozen_a=frozen)
    for m in EXPECTED:
        assert torch.equal(loaded.pairs[m].b, adapter.pairs[m].b)
        assert torch.equal(loaded.pairs[m].a, frozen.pairs[m].a[:4])


def test_lora_a_in_a_b_only_update_is_refused_by_name(tmp_path):
    path = tmp_path / "ab.safetensors"
    path.write_bytes(good_payload(4))
    with pytest.raises(PayloadError, match=rf"unexpected tensor '{Q}.lora_A' \(3 lora_A in all\): this run's updates hold lora_B only"):
        check_adapter(path, EXPECTED, rank=4, with_a=False)
    with pytest.raises(PayloadError, match="hold lora_B only"):
        read_adapter(path, EXPECTED, rank=4, frozen_a=make_adapter(4))


def test_an_update_without_lora_a_is_refused_by_name_where_a_is_trained(tmp_path):
    path = tmp_path / "b.safetensors"
    path.write_bytes(encode_adapter(make_adapter(4), meta_for(4), with_a=False))
    rejects(path, rf"missing tensor '{Q}.lora_A' \(3 lora_A missing in all\): this run's updates hold lora_A and lora_B")


def test_a_b_only_update_checks_b_against_the_rank():
    tensors = {n: t for n, t in adapter_tensors(4).items() if n.endswith("lora_B")}
    tensors[f"{V}.lora_B"] = torch.zeros(64, 3)
    with pytest.raises(PayloadError, match=rf"'{V}.lora_B': shape \(64, 3\) does not match \(out_features, rank\) = \(64, 4\)"):
        read_adapter(raw_payload(tensors), EXPECTED, rank=4, frozen_a=make_adapter(4))
    tensors[f"{V}.lora_B"] = torch.zeros(64, 4)
    with pytest.raises(PayloadError, match="exceeds the frozen A's rank 2"):
        read_adapter(raw_payload(tensors), EXPECTED, rank=4, frozen_a=make_adapter(2))
