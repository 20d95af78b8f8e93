"""Family knowledge (flora.common.architectures): default targets, all-linear, Conv1D's orientation."""

from __future__ import annotations

import hashlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError

from flora.client.config import ClientSettings
from flora.client.local import ConfigError, check_modules, trained_modules
from flora.common.architectures import fan_in_fan_out, target_suffixes
from flora.common.basemodel import fingerprint, target_module_shapes
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.merge import merge_into_model, merge_into_state_dict, merged_temporarily, module_weights
from flora.server.config import ServerSettings
from flora.server.startup import StartupError, check_same_run, defining_settings
from flora.server.store import RunRecord
from flora.v1 import run_pb2
from tiny_families import build_family


def test_default_targets_per_family_and_a_clear_error_where_none_fits():
    assert target_suffixes(build_family("gpt2"), None) == ("c_attn",)
    assert target_suffixes(build_family("phi3"), None) == ("qkv_proj",)
    assert target_suffixes(build_family("gemma3_text"), None) == ("q_proj", "v_proj")
    gpt2 = build_family("gpt2")
    gpt2.config.model_type = "unlisted"  # a family flora does not list: the common q_proj/v_proj
    with pytest.raises(ValueError, match=r"target_modules: no linear layer of the unlisted model .* all-linear"):
        target_module_shapes(gpt2)


def test_all_linear_is_every_linear_and_conv1d_layer_but_the_output_layer():
    gpt2 = build_family("gpt2")
    shapes = target_module_shapes(gpt2, ["all-linear"])
    assert {n.rsplit(".", 1)[1] for n in shapes} == {"c_attn", "c_proj", "c_fc"} and len(shapes) == 2 * 4
    assert shapes["transformer.h.0.attn.c_attn"] == (96, 32) and shapes["transformer.h.0.mlp.c_fc"] == (128, 32)
    phi3 = target_module_shapes(build_family("phi3"), ["all-linear"])
    assert not any("lm_head" in name for name in phi3) and phi3["model.layers.1.mlp.gate_up_proj"] == (128, 32)
    with pytest.raises(ValueError, match="'all-linear' stands alone"):
        target_suffixes(gpt2, ["all-linear", "c_attn"])


def test_settings_default_to_the_family_and_accept_all_linear_alone(tmp_path):
    assert ServerSettings().target_modules is None
    assert ServerSettings(target_modules=["all-linear"]).target_modules == ["all-linear"]
    with pytest.raises(ValidationError, match="stands alone, not beside \\['q_proj'\\]"):
        ServerSettings(target_modules=["all-linear", "q_proj"])
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    assert ClientSettings(name="c", data=[data], target_modules=["all-linear"]).target_modules == ["all-linear"]
    with pytest.raises(ValidationError, match="target_modules"):
        ClientSettings(name="c", data=[data], target_modules=["q_proj", "all-linear"])


def test_a_restart_compares_the_resolved_modules_not_the_spelling():
    stored = defining_settings(ServerSettings(), ("q_proj", "v_proj"))  # unset on a Llama
    run = RunRecord("r", "m", "h", "flora", [], stored, 0, 0.0)
    check_same_run(run, ServerSettings(target_modules=["v_proj", "q_proj"]), ("q_proj", "v_proj"), "h")
    with pytest.raises(StartupError, match="target_modules: stored \\['q_proj', 'v_proj'\\], configured \\['c_attn'\\]"):
        check_same_run(run, ServerSettings(), ("c_attn",), "h")


def conv1d_adapter(model, names, rank=3, seed=0) -> LoraAdapter:
    shapes = target_module_shapes(model, names)
    gen = torch.Generator().manual_seed(seed)
    return LoraAdapter({n: LoraPair(torch.randn(rank, i, generator=gen) * 0.1, torch.randn(o, rank, generator=gen) * 0.1)
                        for n, (o, i) in shapes.items()}, 0.5)


def test_conv1d_weights_are_handed_out_as_out_in_views_that_write_through():
    gpt2 = build_family("gpt2")
    name = "transformer.h.0.attn.c_attn"
    (weight,) = module_weights(gpt2, [name]).values()
    assert weight.shape == (96, 32)
    weight[5, 7] = 3.0
    assert gpt2.get_submodule(name).weight[7, 5] == 3.0
    assert fan_in_fan_out(gpt2, [name]) and not fan_in_fan_out(build_family("llama"), ["model.layers.0.self_attn.q_proj"])


def test_merging_into_conv1d_layers_computes_what_peft_computes_with_the_adapter_attached():
    # all-linear: c_proj is square, where a merge in the wrong orientation would go unnoticed by shapes.
    model, reference = build_family("gpt2"), build_family("gpt2")
    adapter = conv1d_adapter(model, ["all-linear"])
    config = LoraConfig(r=3, lora_alpha=1.5, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, (a, b) in adapter.pairs.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    tokens = torch.arange(3, 30).unsqueeze(0)
    state = merge_into_state_dict(reference.state_dict(), adapter, transposed=set(adapter.pairs))
    with torch.no_grad():
        expected = peft_model(tokens).logits
        merge_into_model(reference, adapter)
        torch.testing.assert_close(reference(tokens).logits, expected, rtol=1e-4, atol=1e-5)
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key


def test_client_checks_conv1d_targets_by_their_out_in_shape_and_all_linear_trains_every_run_module(tmp_path):
    gpt2 = build_family("gpt2")
    name = "transformer.h.0.attn.c_attn"
    spec = run_pb2.RunSpec(method=run_pb2.AGGREGATION_METHOD_FEDIT,
                           target_modules=[run_pb2.TargetModule(name=name, out_features=96, in_features=32)])
    check_modules(gpt2, spec)
    spec.target_modules[0].out_features, spec.target_modules[0].in_features = 32, 96  # as the layer stores it
    with pytest.raises(ConfigError, match=r"is \(96, 32\), the run's is \(32, 96\)"):
        check_modules(gpt2, spec)

    class Settings:  # only the field trained_modules reads
        target_modules = ["all-linear"]

    assert trained_modules(Settings(), spec) == [name]  # even where a method refuses a narrower set


def test_a_conv1d_model_is_fingerprinted_as_protocol_md_says_out_in():
    gpt2 = build_family("gpt2")
    names = sorted(target_module_shapes(gpt2))
    digest = hashlib.sha256()
    for name in names:  # PROTOCOL.md: "<name>:(out_features, in_features)\n", then W^T's float32 bytes, row-major
        weight = gpt2.get_submodule(name).weight.detach().T.contiguous()
        digest.update(f"{name}:{tuple(weight.shape)}\n".encode() + weight.numpy().astype("<f4").tobytes())
    assert fingerprint(gpt2, names) == digest.hexdigest()


def test_merged_temporarily_on_conv1d_layers_merges_in_their_orientation_and_restores_them_exactly():
    gpt2 = build_family("gpt2")
    adapter = conv1d_adapter(gpt2, ["all-linear"], seed=1)
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    expected = merge_into_state_dict(before, adapter, transposed=set(adapter.pairs))
    with merged_temporarily(gpt2, adapter):
        for key, value in gpt2.state_dict().items():
            assert torch.equal(value, expected[key]), key
    for key, value in gpt2.state_dict().items():
        assert torch.equal(value, before[key]), key
