"""validate_durably: the fsync and the validation of an upload run together, refusals intact."""

from __future__ import annotations

import asyncio
import errno
import math
import re
from types import SimpleNamespace

import grpc
import pytest
import torch

from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import ClientStart, get_method
from flora.common.payload import PayloadLimits, PayloadMeta, write_adapter
from flora.common.wire import SUBMIT_UPDATE, decode_update_chunk, update_messages
from flora.server import uploads
from flora.server.errors import InvalidArgument
from flora.server.uploads import validate_durably
from flora.v1 import run_pb2, transfer_pb2

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}
FLORA = (get_method("flora"), ClientStart(init=None, removed=None))  # a fresh start: A and B uploaded


def update(path, round_number: int | None = 3, scale: float = 1.0) -> transfer_pb2.UpdateHeader:
    gen = torch.Generator().manual_seed(0)
    pairs = {n: LoraPair(torch.randn(2, i, generator=gen) * scale, torch.randn(o, 2, generator=gen))
             for n, (o, i) in SHAPES.items()}
    meta = PayloadMeta("client_update", rank=2, alpha=2.0, scaling_rule="standard", round=round_number)
    size, sha = write_adapter(path, LoraAdapter(pairs, 1.0), meta)
    return transfer_pb2.UpdateHeader(round=3, rank=2, alpha=2.0, scaling_rule=run_pb2.SCALING_RULE_STANDARD,
                                     num_examples=1, total_bytes=size, sha256=sha)


def test_a_valid_update_is_fsynced(tmp_path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(uploads, "fsync_path", lambda path: synced.append(path))
    header = update(tmp_path / "u.safetensors")
    asyncio.run(validate_durably(tmp_path / "u.safetensors", header, SHAPES, PayloadLimits(), math.inf, *FLORA))
    assert synced == [tmp_path / "u.safetensors"]


def test_a_refusal_wins_over_an_fsync_error_and_both_are_waited_for(tmp_path, monkeypatch) -> None:
    def failing_fsync(path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(uploads, "fsync_path", failing_fsync)
    header = update(tmp_path / "u.safetensors", round_number=4)  # metadata round 4, header round 3
    with pytest.raises(InvalidArgument, match="metadata 'round' 4 differs"):
        asyncio.run(validate_durably(tmp_path / "u.safetensors", header, SHAPES, PayloadLimits(), math.inf, *FLORA))
    header = update(tmp_path / "v.safetensors")
    with pytest.raises(OSError, match="No space left"):
        asyncio.run(validate_durably(tmp_path / "v.safetensors", header, SHAPES, PayloadLimits(), math.inf, *FLORA))


def test_the_norm_bound_still_refuses(tmp_path) -> None:
    header = update(tmp_path / "u.safetensors", scale=100.0)
    with pytest.raises(InvalidArgument, match="exceeds max_update_norm"):
        asyncio.run(validate_durably(tmp_path / "u.safetensors", header, SHAPES, PayloadLimits(), 1.0, *FLORA))


@pytest.mark.parametrize(("round_number", "max_norm", "message"), [
    (None, math.inf, "payload: metadata 'round' is missing (a client update names its round, here 3) (run method flora)"),
    (4, math.inf, "payload: metadata 'round' 4 differs from the header's round 3 (run method flora)"),
    (3, 1e-3, "exceeds max_update_norm 0.001 (run method flora)"),
])
def test_metadata_and_norm_refusals_name_the_run_method(tmp_path, round_number, max_norm, message) -> None:
    header = update(tmp_path / "u.safetensors", round_number=round_number)
    with pytest.raises(InvalidArgument) as refused:
        uploads.validate_payload(tmp_path / "u.safetensors", header, SHAPES, PayloadLimits(), max_norm, *FLORA)
    assert str(refused.value).startswith("payload: ") and str(refused.value).endswith(message)


def exact_norm(path) -> float:
    return uploads.file_change_norm(path, SHAPES, 1.0, FLORA[1])


def fail(what: str):
    def failing(*args):
        raise AssertionError(f"{what} ran although a cheaper proof decided")
    return failing


def test_a_norm_far_below_the_limit_is_proved_by_the_sums_of_squares_alone(tmp_path, monkeypatch) -> None:
    path = tmp_path / "u.safetensors"
    header = update(path)
    exact = exact_norm(path)
    monkeypatch.setattr(uploads, "change_norm_sq_interval", fail("the float32 products"))
    monkeypatch.setattr(uploads, "file_change_norm", fail("the float64 pass"))
    uploads.validate_payload(path, header, SHAPES, PayloadLimits(), 10.0 * exact, *FLORA)


def test_a_norm_clear_of_the_limit_is_proved_in_float32_without_the_exact_pass(tmp_path, monkeypatch) -> None:
    """Rank 2: the ceiling |B| |A| is above 1.01 x the norm here, so the products decide."""
    path = tmp_path / "u.safetensors"
    header = update(path)
    exact = exact_norm(path)
    proofs = []
    interval = uploads.change_norm_sq_interval
    monkeypatch.setattr(uploads, "change_norm_sq_interval", lambda *args: proofs.append(1) or interval(*args))
    monkeypatch.setattr(uploads, "file_change_norm", fail("the float64 pass"))
    uploads.validate_payload(path, header, SHAPES, PayloadLimits(), 1.01 * exact, *FLORA)
    assert len(proofs) == len(SHAPES)


@pytest.mark.parametrize("margin", [1e-9, -1e-9])
def test_a_norm_at_the_limit_is_decided_by_the_exact_float64_value(tmp_path, margin) -> None:
    """Within float32's error of the limit the interval straddles it: the float64 norm decides,
    and a refusal names it."""
    path = tmp_path / "u.safetensors"
    header = update(path)
    exact = exact_norm(path)
    limit = exact * (1.0 + margin)
    if margin > 0:
        uploads.validate_payload(path, header, SHAPES, PayloadLimits(), limit, *FLORA)
    else:
        with pytest.raises(InvalidArgument, match=f"= {exact:.6g} exceeds max_update_norm"):
            uploads.validate_payload(path, header, SHAPES, PayloadLimits(), limit, *FLORA)


def test_a_float32_overflow_falls_back_to_the_exact_norm(tmp_path) -> None:
    path = tmp_path / "u.safetensors"
    header = update(path, scale=1e30)  # A ~1e30: float32 sums and Grams overflow, float64 does not
    exact = exact_norm(path)
    assert exact > 1e29
    uploads.validate_payload(path, header, SHAPES, PayloadLimits(), exact * (1 + 1e-9), *FLORA)
    with pytest.raises(InvalidArgument, match=re.escape(f"= {exact:.6g} exceeds")):
        uploads.validate_payload(path, header, SHAPES, PayloadLimits(), exact * (1 - 1e-9), *FLORA)


def ffa_start(rank: int = 2) -> tuple:
    """An ffa run's method and a client's start: the leading rows of the seeded global LoRA (rank 4)."""
    ffa = get_method("ffa")
    kept = ffa.initial(SHAPES, 4, 1.0, seed=7)
    return ffa, ffa.start(kept, rank, 1.0)


def b_only_update(path, scale: float = 1.0) -> tuple[transfer_pb2.UpdateHeader, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    pairs = {n: LoraPair(torch.full((2, i), 1e30), torch.randn(o, 2, generator=gen) * scale) for n, (o, i) in SHAPES.items()}
    meta = PayloadMeta("client_update", rank=2, alpha=2.0, scaling_rule="standard", round=3)
    size, sha = write_adapter(path, LoraAdapter(pairs, 1.0), meta, with_a=False)  # the huge A is not written
    header = transfer_pb2.UpdateHeader(round=3, rank=2, alpha=2.0, scaling_rule=run_pb2.SCALING_RULE_STANDARD,
                                       num_examples=1, total_bytes=size, sha256=sha)
    return header, {n: p.b for n, p in pairs.items()}


def test_an_ffa_upload_holds_b_alone_and_its_norm_uses_the_servers_a(tmp_path) -> None:
    method, start = ffa_start()
    header, bs = b_only_update(tmp_path / "b.safetensors")
    want = math.sqrt(sum(float((bs[n].double() @ start.init.pairs[n].a.double()).square().sum()) for n in SHAPES))
    uploads.validate_payload(tmp_path / "b.safetensors", header, SHAPES, PayloadLimits(), 1.001 * want, method, start)
    with pytest.raises(InvalidArgument, match=re.escape(f"= {want:.6g} exceeds max_update_norm")):
        uploads.validate_payload(tmp_path / "b.safetensors", header, SHAPES, PayloadLimits(), 0.999 * want, method, start)


def test_an_ffa_upload_with_lora_a_is_refused_naming_the_tensor_and_the_method(tmp_path) -> None:
    header = update(tmp_path / "ab.safetensors")
    with pytest.raises(InvalidArgument, match=r"payload: unexpected tensor 'model.layers.0.self_attn.q_proj.lora_A' "
                                              r"\(2 lora_A in all\): this run's updates hold lora_B only .*\(run method ffa\)"):
        uploads.validate_payload(tmp_path / "ab.safetensors", header, SHAPES, PayloadLimits(), math.inf, *ffa_start())


@pytest.mark.parametrize("name", ["flora", "fedex"])
def test_an_upload_without_lora_a_is_refused_where_the_method_trains_a(tmp_path, name) -> None:
    header, _ = b_only_update(tmp_path / "b.safetensors")
    method = get_method(name)
    kept = method.initial(SHAPES, 2, 1.0, seed=7)
    with pytest.raises(InvalidArgument, match=rf"payload: missing tensor 'model.layers.0.self_attn.q_proj.lora_A' "
                                              rf"\(2 lora_A missing in all\).* \(run method {name}\)"):
        uploads.validate_payload(tmp_path / "b.safetensors", header, SHAPES, PayloadLimits(), math.inf, method,
                                 method.start(kept, 2, 1.0))


@pytest.mark.parametrize("name", ["fedex", "ffa"])
def test_a_warm_upload_is_measured_by_its_change_from_the_start(tmp_path, name) -> None:
    method = get_method(name)
    gen = torch.Generator().manual_seed(5)
    kept = LoraAdapter({n: LoraPair(torch.randn(4, i, generator=gen), 100 * torch.randn(o, 4, generator=gen))
                        for n, (o, i) in SHAPES.items()}, 1.0)  # a large global LoRA: the start is not the change
    start = method.start(kept, 2, 1.0)
    moved = {n: LoraPair(p.a + (0.1 * torch.randn(p.a.shape, generator=gen) if start.train_a else 0),
                         p.b + torch.randn(p.b.shape, generator=gen))
             for n, p in start.init.pairs.items()}
    meta = PayloadMeta("client_update", rank=2, alpha=2.0, scaling_rule="standard", round=3)
    size, sha = write_adapter(tmp_path / "w.safetensors", LoraAdapter(moved, 1.0), meta, with_a=start.train_a)
    header = transfer_pb2.UpdateHeader(round=3, rank=2, alpha=2.0, scaling_rule=run_pb2.SCALING_RULE_STANDARD,
                                       num_examples=1, total_bytes=size, sha256=sha)
    want = math.sqrt(sum(float((p.b.double() @ p.a.double() - start.init.delta(n, torch.float64)).square().sum())
                         for n, p in moved.items()))
    trained = math.sqrt(sum(float((p.b.double() @ p.a.double()).square().sum()) for p in moved.values()))
    assert trained > 10 * want  # what the old check measured
    uploads.validate_payload(tmp_path / "w.safetensors", header, SHAPES, PayloadLimits(), 1.001 * want, method, start)
    with pytest.raises(InvalidArgument, match=re.escape(f"= {want:.6g} exceeds")):  # not the trained |s B A|
        uploads.validate_payload(tmp_path / "w.safetensors", header, SHAPES, PayloadLimits(), 0.999 * want, method, start)


async def _after_header(header: transfer_pb2.UpdateHeader, data: bytes):
    """The client's SubmitUpdate stream in 64-byte pieces, less the header ``receive_payload`` is given."""
    for message in list(update_messages(header, data, chunk_size=64))[1:]:
        yield message


def test_a_received_payload_lands_in_a_preallocated_temporary_file(tmp_path) -> None:
    header = update(tmp_path / "u.safetensors")
    data = (tmp_path / "u.safetensors").read_bytes()
    (tmp_path / "tmp").mkdir()
    path = asyncio.run(uploads.receive_payload(header, _after_header(header, data), tmp_path / "tmp", 1 << 20))
    assert path.parent == tmp_path / "tmp" and path.read_bytes() == data


def test_a_full_disk_when_the_upload_file_is_created_leaves_no_file(tmp_path, monkeypatch) -> None:
    header = update(tmp_path / "u.safetensors")
    data = (tmp_path / "u.safetensors").read_bytes()
    (tmp_path / "tmp").mkdir()

    def full(writer: uploads.PreallocatedWriter, upto: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uploads.PreallocatedWriter, "_allocate", full)
    with pytest.raises(OSError) as raised:
        asyncio.run(uploads.receive_payload(header, _after_header(header, data), tmp_path / "tmp", 1 << 20))
    assert raised.value.errno == errno.ENOSPC  # what the servicer maps to RESOURCE_EXHAUSTED
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_piece_views_interceptor_decodes_submit_update_alone() -> None:
    async def behaviour(requests, context):
        return None

    def details(method: str):
        return SimpleNamespace(method=method, invocation_metadata=())

    async def intercept(method: str, handler):
        async def continuation(_details):
            return handler
        return await uploads.PieceViews().intercept_service(continuation, details(method))

    upload = grpc.stream_unary_rpc_method_handler(behaviour, request_deserializer=transfer_pb2.UpdateChunk.FromString,
                                                  response_serializer=bytes)
    swapped = asyncio.run(intercept(SUBMIT_UPDATE, upload))
    assert swapped.request_deserializer is decode_update_chunk
    assert (swapped.stream_unary, swapped.response_serializer) == (behaviour, bytes)
    assert asyncio.run(intercept("/flora.v1.Coordinator/Heartbeat", upload)) is upload
    assert asyncio.run(intercept(SUBMIT_UPDATE, None)) is None
