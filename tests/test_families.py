"""Every supported model family, one round end to end in one process: server == client == oracle.

The round goes through the code the processes run: the server's ``open_run`` (target modules
resolved on the model, fingerprint) and ``run_spec``, the client's ``check_modules``,
fingerprint check and ``train_lora``, the upload payload as the daemon encodes it, the server's
``Aggregator.aggregate`` (validation, merge in place, downlink, checkpoint and PEFT adapter) and
the client's merge of the downlink. The oracle is independent of flora's merge: the stored
weights plus sum_k p_k s_k B_k A_k in float64, transposed by the test itself for GPT-2's Conv1D,
which stores (in, out). The exported adapter must make ``PeftModel.from_pretrained`` reproduce the
exported checkpoint; the servers and clients of real processes are in test_families_processes.
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
from flora.client.trainer import TrainConfig, train_lora
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


def client_round(model_dir: Path, spec, rank: int, count: int, seed: int) -> tuple[LoraAdapter, int]:
    """What one client does with its own copy of the base model: check it, train, return the LoRA."""
    model = load_model(str(model_dir))
    check_modules(model, spec)
    names = [m.name for m in spec.target_modules]
    assert fingerprint(model, names) == spec.base_model_hash
    tokenizer = load_tokenizer(str(model_dir))
    examples = [Example(f"Add {i} and {seed}: ", str(i + seed)) for i in range(count)]
    data = tokenize_examples(examples, tokenizer, cutoff=32)
    config = TrainConfig(rank=rank, target_modules=tuple(names), max_steps=2, batch_size=2, learning_rate=0.05,
                         device="cpu", seed=seed)
    return train_lora(model, data, config).adapter, count


def upload(layout: Layout, adapter: LoraAdapter, client_id: str, rank: int, count: int) -> Submission:
    """The client's upload as the daemon encodes it, stored where the server keeps accepted ones."""
    payload = encode_adapter(adapter, PayloadMeta("client_update", rank=rank, alpha=2.0 * rank, scaling_rule="standard", round=1))
    sha = hashlib.sha256(payload).hexdigest()
    path = layout.update(1, client_id, sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return Submission(1, client_id, sha, layout.relative(path), len(payload), rank, 2.0 * rank, 1, count, 0,
                      None, None, 2, 0.0, 0.0)


def stored_weight(model, name: str) -> torch.Tensor:
    """The weight as the layer stores it, read without flora's helpers."""
    return model.get_submodule(name).weight.detach()


@pytest.mark.parametrize(("family", "targets", "suffixes"), CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_one_round_server_client_oracle_and_peft_export_agree(tmp_path, family_dirs, family, targets, suffixes):
    model_dir = family_dirs[family]
    settings = ServerSettings(base_model=str(model_dir), state_dir=tmp_path / "state", method="flora", rounds=1,
                              merge_device="cpu", target_modules=targets)
    layout = Layout(tmp_path / "state")
    layout.create()
    aggregator = Aggregator(settings, layout)
    store = Store(layout.database)
    try:
        spec = run_spec(settings, open_run(settings, layout, store, aggregator), aggregator.shapes)
    finally:
        store.close()
    names = sorted(expected_shapes(spec))
    assert {n.rsplit(".", 1)[1] for n in names} == (suffixes or DEFAULTS.get(family, {"q_proj", "v_proj"}))
    trained = [client_round(model_dir, spec, rank, count, seed) for seed, (_, rank, count) in enumerate(CLIENTS)]
    submissions = [upload(layout, adapter, cid, rank, count) for (adapter, count), (cid, rank, _) in zip(trained, CLIENTS)]
    output = aggregator.aggregate(1, submissions)

    # The oracle: base + sum_k p_k s_k B_k A_k in float64, in the orientation each layer stores.
    base = load_model(str(model_dir))
    oracle = {}
    for name in names:
        delta = sum(p * a.scaling * (a.pairs[name].b.double() @ a.pairs[name].a.double())
                    for p, (a, _) in zip(output.weights, trained))
        transposed = isinstance(base.get_submodule(name), Conv1D)
        oracle[name] = stored_weight(base, name).double() + (delta.T if transposed else delta)
        assert delta.abs().max() > 1e-4, name  # the round changed every module: the check below can fail
    # The client merges the downlink it downloads into its own copy.
    client = load_model(str(model_dir))
    downlink, _ = read_update(layout.downlink(1), expected_shapes(spec))
    MergedWeights(client, names).apply([downlink])
    checkpoint = layout.root / output.checkpoint
    exported = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for name in names:
        for holder in (aggregator.model, client, exported):
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
