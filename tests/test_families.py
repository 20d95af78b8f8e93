"""Every supported model family, one round end to end in one process: server == client == oracle.

The round goes through the code the processes run: the server's ``open_run`` (target modules
resolved on the model, fingerprint) and ``run_spec``, the client's ``check_modules``,
fingerprint check and ``train_round`` (the method's start), the upload payload as the daemon encodes it, the server's
``Aggregator.aggregate`` (validation, merge in place, downlink, checkpoint and PEFT adapter) and
the client's merge of the downlink. The oracle is independent of flora's merge: the stored
weights plus sum_k p_k s_k B_k A_k in float64, transposed by the test itself for GPT-2's Conv1D,
which stores (in, out). The exported adapter must make ``PeftModel.from_pretrained`` reproduce the
exported checkpoint. A warm-started method (two rounds, GPT-2, all-linear) must stay exact too;
the servers and clients of real processes are in test_families_processes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from flora.client.local import check_modules
from flora.client.local_weights import MergedWeights
from flora.client.sync import expected_shapes
from flora.client.round_start import train_round
from flora.client.trainer import TrainConfig
from flora.common.basemodel import fingerprint, load_model, load_tokenizer
from flora.common.data import Example, tokenize_examples
from flora.common.lora import LoraAdapter
from flora.common.payload import PayloadMeta, encode_adapter, read_update
from flora.server.aggregator import Aggregator
from flora.server.config import ServerSettings
from flora.server.coordinator import run_spec
from flora.server.layout import Layout
from flora.server.startup import open_run
from flora.server.store import Store, Submission
from flora.v1 import run_pb2
from test_methods_integration import top
from tiny_families import FAMILIES, write_family

# (family, target_modules setting, the suffixes it must resolve to): every family's default, and
# all-linear where it differs most (fused layers; GPT-2's square Conv1D c_proj, where a wrong
# orientation would pass every shape check).
CASES = [(family, None, None) for family in FAMILIES] + [
    ("gpt2", ["all-linear"], {"c_attn", "c_proj", "c_fc"}),
    ("phi3", ["all-linear"], {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    ("qwen3", ["all-linear"], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
]
DEFAULTS = {"phi3": {"qkv_proj"}, "gpt2": {"c_attn"}}  # every other family: q_proj and v_proj
CLIENTS = (("a1", 4, 6), ("b2", 2, 3))  # client id (hex), rank, number of examples


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: write_family(root / family, family) for family in FAMILIES}


def open_server(tmp_path: Path, model_dir: Path, **settings) -> tuple[Aggregator, run_pb2.RunSpec, Layout]:
    """The server's model, run and the spec its clients receive, as ``flora-server`` opens them."""
    server_settings = ServerSettings(base_model=str(model_dir), state_dir=tmp_path / "state", merge_device="cpu", **settings)
    layout = Layout(tmp_path / "state")
    layout.create()
    aggregator = Aggregator(server_settings, layout)
    store = Store(layout.database)
    try:
        spec = run_spec(server_settings, open_run(server_settings, layout, store, aggregator), aggregator.shapes)
    finally:
        store.close()
    return aggregator, spec, layout


def client_model(model_dir: Path, spec: run_pb2.RunSpec) -> torch.nn.Module:
    """A client's own copy of the base model, checked against the run as ``load_local_model`` does."""
    model = load_model(str(model_dir))
    check_modules(model, spec)
    assert fingerprint(model, [m.name for m in spec.target_modules]) == spec.base_model_hash
    return model


def client_round(model, model_dir: Path, spec, start_of, rank: int, count: int, seed: int) -> LoraAdapter:
    """One client's round on its model: the method's start (``aggregator.start_of``), two steps."""
    examples = [Example(f"Add {i} and {seed}: ", str(i + seed)) for i in range(count)]
    data = tokenize_examples(examples, load_tokenizer(str(model_dir)), cutoff=32)
    config = TrainConfig(rank=rank, target_modules=tuple(m.name for m in spec.target_modules), max_steps=2,
                         batch_size=2, learning_rate=0.05, device="cpu", seed=seed)
    return train_round(model, data, config, start_of(rank, config.scaling)).adapter


def upload(layout: Layout, adapter: LoraAdapter, number: int, client_id: str, rank: int, count: int) -> Submission:
    """The client's upload as the daemon encodes it, stored where the server keeps accepted ones."""
    meta = PayloadMeta("client_update", rank=rank, alpha=2.0 * rank, scaling_rule="standard", round=number)
    payload = encode_adapter(adapter, meta)
    sha = hashlib.sha256(payload).hexdigest()
    path = layout.update(number, client_id, sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return Submission(number, client_id, sha, layout.relative(path), len(payload), rank, 2.0 * rank, 1, count, number - 1,
                      None, None, 2, 0.0, 0.0)


def play_round(number: int, aggregator: Aggregator, layout: Layout, spec, model_dir: Path, clients: list) -> tuple:
    """Every client trains and uploads, the server aggregates, every client merges the downlink;
    returns the round's output and each client's adapter."""
    trained = [client_round(model, model_dir, spec, aggregator.start_of, rank, count, seed + 10 * number)
               for model, (seed, (_, rank, count)) in zip(clients, enumerate(CLIENTS))]
    output = aggregator.aggregate(number, [upload(layout, adapter, number, cid, rank, count)
                                           for adapter, (cid, rank, count) in zip(trained, CLIENTS)])
    downlink, _ = read_update(layout.downlink(number), expected_shapes(spec))
    for model in clients:
        MergedWeights(model, downlink).apply([downlink])  # what Synchroniser.catch_up asks of a full-precision base
    return output, trained


def dense(adapter: LoraAdapter, name: str) -> torch.Tensor:
    """s B A of one module in float64, (out, in)."""
    return adapter.scaling * (adapter.pairs[name].b.double() @ adapter.pairs[name].a.double())


def stored_weight(model, name: str) -> torch.Tensor:
    """The weight as the layer stores it, read without flora's helpers."""
    return model.get_submodule(name).weight.detach()


def as_stored(model, name: str, delta: torch.Tensor) -> torch.Tensor:
    """An (out, in) delta in the orientation the layer stores (Conv1D: (in, out)), decided here."""
    return delta.T if isinstance(model.get_submodule(name), Conv1D) else delta


@pytest.mark.parametrize(("family", "targets", "suffixes"), CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_one_round_server_client_oracle_and_peft_export_agree(tmp_path, family_dirs, family, targets, suffixes):
    model_dir = family_dirs[family]
    aggregator, spec, layout = open_server(tmp_path, model_dir, method="flora", rounds=1, target_modules=targets)
    names = sorted(expected_shapes(spec))
    assert {n.rsplit(".", 1)[1] for n in names} == (suffixes or DEFAULTS.get(family, {"q_proj", "v_proj"}))
    clients = [client_model(model_dir, spec) for _ in CLIENTS]
    output, trained = play_round(1, aggregator, layout, spec, model_dir, clients)

    # The oracle: base + sum_k p_k s_k B_k A_k in float64, in the orientation each layer stores.
    base = load_model(str(model_dir))
    oracle = {}
    for name in names:
        delta = sum(p * dense(adapter, name) for p, adapter in zip(output.weights, trained))
        oracle[name] = stored_weight(base, name).double() + as_stored(base, name, delta)
        assert delta.abs().max() > 1e-4, name  # the round changed every module: the check below can fail
    checkpoint = layout.root / output.checkpoint
    exported = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for name in names:
        for holder in (aggregator.model, *clients, exported):
            torch.testing.assert_close(stored_weight(holder, name).double(), oracle[name], rtol=0, atol=1e-6)

    # The PEFT adapter on the base model computes what the merged checkpoint computes.
    from peft import PeftModel

    config = json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (family == "gpt2")
    peft_model = PeftModel.from_pretrained(load_model(str(model_dir)), checkpoint / "adapter").eval()
    tokens = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, exported.eval()(tokens).logits, rtol=1e-4, atol=1e-5)
        assert (exported(tokens).logits - base(tokens).logits).abs().max() > 1e-4  # the adapter is not a no-op


def test_gpt2_warm_started_rounds_stay_exact_on_conv1d_layers(tmp_path, family_dirs):
    # flora-warm: round 2 starts from the top-r_k part of round 1's aggregate, removed from each
    # client's model while it trains (Conv1D layers, square c_proj included) and restored after;
    # the server keeps the global LoRA between rounds. Both rounds must stay exact.
    model_dir = family_dirs["gpt2"]
    aggregator, spec, layout = open_server(tmp_path, model_dir, method="flora-warm", rounds=2, target_modules=["all-linear"])
    clients = [client_model(model_dir, spec) for _ in CLIENTS]
    (first, round_1), (second, round_2) = (play_round(n, aggregator, layout, spec, model_dir, clients) for n in (1, 2))
    base = load_model(str(model_dir))
    for name in sorted(expected_shapes(spec)):
        aggregate = sum(p * dense(adapter, name) for p, adapter in zip(first.weights, round_1))
        delta = aggregate + sum(p * (dense(adapter, name) - top(aggregate, adapter.rank))
                                for p, adapter in zip(second.weights, round_2))
        oracle = stored_weight(base, name).double() + as_stored(base, name, delta)
        for holder in (aggregator.model, *clients):
            torch.testing.assert_close(stored_weight(holder, name).double(), oracle, rtol=0, atol=1e-5)
