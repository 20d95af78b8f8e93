"""A third-party client written from protos/ and protos/PROTOCOL.md alone completes a round.

It imports nothing of flora but the generated stubs (``flora.v1``); the model is read with
transformers, payloads are built with safetensors and torch, hashes with hashlib, exactly as the
document describes them. The real server process must accept its update and serve a global
adapter equal to ``s B A`` (one client: weight 1).
"""

from __future__ import annotations

import hashlib
import json
import struct

import grpc
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from flora.v1 import coordinator_pb2 as pb
from flora.v1 import coordinator_pb2_grpc, run_pb2, transfer_pb2
from harness import running_server

pytestmark = pytest.mark.slow

RANK, ALPHA = 3, 6.0


def fingerprint(model, names) -> str:
    """PROTOCOL.md, "Base-model fingerprint"."""
    digest = hashlib.sha256()
    modules = dict(model.named_modules())
    for name in sorted(names):
        weight = modules[name].weight.detach().to(torch.float32).contiguous()
        digest.update(f"{name}:{tuple(weight.shape)}\n".encode())
        digest.update(weight.numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def update_payload(spec: run_pb2.RunSpec, round_number: int) -> tuple[bytes, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """PROTOCOL.md, "Payloads": the factors and the metadata table's client_update column."""
    gen = torch.Generator().manual_seed(0)
    factors, tensors = {}, {}
    for module in spec.target_modules:
        a = torch.randn(RANK, module.in_features, generator=gen) * 0.05
        b = torch.randn(module.out_features, RANK, generator=gen) * 0.05
        factors[module.name] = (a, b)
        tensors[f"{module.name}.lora_A"], tensors[f"{module.name}.lora_B"] = a, b
    metadata = {"format": "flora.lora.v1", "kind": "client_update", "rank": str(RANK), "alpha": repr(ALPHA),
                "scaling_rule": "standard", "scaling": repr(ALPHA / RANK), "round": str(round_number)}
    return save_safetensors(tensors, metadata=metadata), factors


def test_a_client_from_the_documents_alone_completes_a_round(tmp_path, tiny_model_dir):
    flags = ("--min-clients", "1", "--rounds", "1", "--long-poll-s", "0.5", "--checkpoint-every", "0")
    with running_server(tmp_path / "state", *flags) as server, grpc.insecure_channel(server.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        spec = stub.GetRun(pb.GetRunRequest(), timeout=30).run
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        names = [m.name for m in spec.target_modules]
        caps = pb.Capabilities(rank=RANK, alpha=ALPHA, scaling_rule=run_pb2.SCALING_RULE_STANDARD, num_examples=7)
        joined = stub.Join(pb.JoinRequest(client_name="outsider", capabilities=caps,
                                          base_model_hash=fingerprint(model, names)), timeout=30)
        auth = [("authorization", f"Bearer {joined.client_token}")]
        for _ in range(60):
            task = stub.NextTask(pb.NextTaskRequest(max_wait_ms=1000), metadata=auth, timeout=30)
            if task.WhichOneof("kind") == "train":
                break
        train = task.train
        payload, factors = update_payload(spec, train.round)
        header = transfer_pb2.UpdateHeader(
            round=train.round, rank=RANK, alpha=ALPHA, scaling_rule=run_pb2.SCALING_RULE_STANDARD, num_examples=7,
            total_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(), base_version=train.required_version)
        size = spec.chunk_size
        messages = [transfer_pb2.UpdateChunk(header=header)] + [
            transfer_pb2.UpdateChunk(piece=transfer_pb2.UpdatePiece(offset=o, data=payload[o:o + size]))
            for o in range(0, len(payload), size)]
        reply = stub.SubmitUpdate(iter(messages), metadata=auth, timeout=60)
        assert reply.accepted and not reply.duplicate
        for _ in range(120):
            task = stub.NextTask(pb.NextTaskRequest(max_wait_ms=1000), metadata=auth, timeout=30)
            if task.WhichOneof("kind") == "finished":
                break
        assert task.finished.final_version == 1
        request = pb.FetchGlobalRequest(kind=transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE, from_version=0, to_version=1)
        chunks = list(stub.FetchGlobal(request, metadata=auth, timeout=60))
        data = b"".join(c.data for c in chunks)
        assert [c.offset for c in chunks][0] == 0 and len(data) == chunks[0].total_bytes
        assert hashlib.sha256(data).hexdigest() == chunks[0].sha256
        (length,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + length])["__metadata__"]
        assert metadata["format"] == "flora.update.v1" and metadata["kind"] == "global_update"
        update = load_safetensors(data)
        for name, (a, b) in factors.items():  # per module: canonical factors, or a dense delta when smaller
            if f"{name}.delta" in update:
                got = update[f"{name}.delta"].double()
            else:
                got = update[f"{name}.lora_B"].double() @ update[f"{name}.lora_A"].double()
            torch.testing.assert_close(got, (ALPHA / RANK) * b.double() @ a.double(), rtol=1e-5, atol=1e-7)
