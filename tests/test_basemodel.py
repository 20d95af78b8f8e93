"""The built-in tiny model loads like any Hugging Face model and is identical everywhere."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flora.common import basemodel
from flora.common.basemodel import BUILTIN_MODEL, DEFAULT_TARGET_MODULES, fingerprint, resolve_model, target_module_shapes

# sha256 of the built-in model's q_proj/v_proj weights (the shipped pre-training, revision v4); a change here
# means every deployed client and server would disagree, so it must be deliberate (bump
# _BUILTIN_REVISION).
BUILTIN_FINGERPRINT = "ff18e1d83112dcc9dd8c9e03ac9743e97e7590e23892b212be0bab5bb5b53916"


def test_builtin_model_is_a_normal_hugging_face_directory(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    params = sum(p.numel() for p in model.parameters())
    assert 200_000 <= params <= 5_000_000
    assert json.loads((basemodel.Path(tiny_model_dir) / "config.json").read_text())["model_type"] == "llama"
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert len(tokenizer) == model.config.vocab_size


def test_builtin_model_is_seeded_identically(tiny_model):
    shapes = target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES)
    assert fingerprint(tiny_model, shapes) == BUILTIN_FINGERPRINT


def test_fresh_build_matches_the_cache(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("FLORA_CACHE", str(tmp_path))
    rebuilt = AutoModelForCausalLM.from_pretrained(resolve_model(BUILTIN_MODEL))
    assert str(tmp_path) in resolve_model(BUILTIN_MODEL)
    for (name, a), (_, b) in zip(sorted(rebuilt.state_dict().items()), sorted(tiny_model.state_dict().items())):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("text", ["Hello, world!", "naïve café 日本語 🙂", "", "  leading spaces\n\ttabs"])
def test_byte_level_tokenizer_round_trips_any_text(tiny_tokenizer, text):
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_resolve_model_passes_hub_ids_through_and_resolves_directories(tmp_path):
    assert resolve_model("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())


def test_target_modules_match_whole_name_components(tiny_model):
    shapes = target_module_shapes(tiny_model, ["q_proj", "v_proj"])
    assert len(shapes) == 2 * tiny_model.config.num_hidden_layers
    assert shapes["model.layers.0.self_attn.q_proj"] == (128, 128)
    assert shapes["model.layers.0.self_attn.v_proj"] == (64, 128)
    with pytest.raises(ValueError, match="no linear layer"):
        target_module_shapes(tiny_model, ["proj"])
    with pytest.raises(ValueError, match="at least one"):
        target_module_shapes(tiny_model, [])


def test_fingerprint_changes_when_a_weight_changes(tiny_model):
    names = list(target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES))
    before = fingerprint(tiny_model, names)
    with torch.no_grad():
        tiny_model.get_submodule(names[0]).weight[0, 0] += 1e-3
    assert fingerprint(tiny_model, names) != before


def test_fingerprint_agrees_across_exact_dtype_casts(tiny_model):
    names = list(target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES))
    rounded = tiny_model.to(torch.bfloat16)
    in_bf16 = fingerprint(rounded, names)
    assert fingerprint(rounded.to(torch.float32), names) == in_bf16
    assert in_bf16 != BUILTIN_FINGERPRINT  # rounding to bfloat16 changed the weights
