"""validate_durably: the fsync and the validation of an upload run together, refusals intact."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from flora.common.lora import LoraAdapter, LoraPair
from flora.common.payload import PayloadLimits, PayloadMeta, write_adapter
from flora.server import uploads
from flora.server.errors import InvalidArgument
from flora.server.uploads import validate_durably
from flora.v1 import run_pb2, transfer_pb2

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}


def update(path, round_number: int = 3, scale: float = 1.0) -> transfer_pb2.UpdateHeader:
    gen = torch.Generator().manual_seed(0)
    pairs = {n: LoraPair(torch.randn(2, i, generator=gen) * scale, torch.randn(o, 2, generator=gen))
             for n, (o, i) in SHAPES.items()}
    meta = PayloadMeta("client_update", rank=2, alpha=2.0, scaling_rule="standard", round=round_number)
    size, sha = write_adapter(path, LoraAdapter(pairs, 1.0), meta)
    return transfer_pb2.UpdateHeader(round=3, rank=2, alpha=2.0, scaling_rule=run_pb2.SCALING_RULE_STANDARD,
                                     num_examples=1, total_bytes=size, sha256=sha)


def test_a_valid_update_is_fsynced_and_its_norm_returned(tmp_path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(uploads, "fsync_path", lambda path: synced.append(path))
    header = update(tmp_path / "u.safetensors")
    norm = asyncio.run(validate_durably(tmp_path / "u.safetensors", header, SHAPES, PayloadLimits(), math.inf))
    assert norm > 0 and synced == [tmp_path / "u.safetensors"]


def test_a_refusal_wins_over_an_fsync_error_and_both_are_waited_for(tmp_path, monkeypatch) -> None:
    def failing_fsync(path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(uploads, "fsync_path", failing_fsync)
    header = update(tmp_path / "u.safetensors", round_number=4)  # metadata round 4, header round 3
    with pytest.raises(InvalidArgument, match="metadata 'round' 4 differs"):
        asyncio.run(validate_durably(tmp_path / "u.safetensors", header, SHAPES, PayloadLimits(), math.inf))
    header = update(tmp_path / "v.safetensors")
    with pytest.raises(OSError, match="No space left"):
        asyncio.run(validate_durably(tmp_path / "v.safetensors", header, SHAPES, PayloadLimits(), math.inf))


def test_the_norm_bound_still_refuses(tmp_path) -> None:
    header = update(tmp_path / "u.safetensors", scale=100.0)
    with pytest.raises(InvalidArgument, match="exceeds max_update_norm"):
        asyncio.run(validate_durably(tmp_path / "u.safetensors", header, SHAPES, PayloadLimits(), 1.0))
