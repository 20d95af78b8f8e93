"""--shard layers: the model's blocks spread over several devices, trained in one process."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from flora.client.config import ClientSettings
from flora.client.layer_placement import layer_map, place_layers, placed_across_devices
from flora.client.local import ConfigError, load_base
from flora.client.trainer import TrainConfig, train_lora
from flora.common.basemodel import BUILTIN_MODEL
from flora.common.devices import model_bytes
from flora.common.data import Example, tokenize_examples


def test_whole_blocks_go_to_the_devices_in_order_balanced(tiny_model):
    size = model_bytes(tiny_model)
    placement = layer_map(tiny_model, [size, size])
    indexes = list(placement.values())
    assert indexes == sorted(indexes) and set(indexes) == {0, 1}  # in order, both devices used
    assert placement["model.embed_tokens"] == 0 and placement["lm_head"] == 1
    assert not any(re.match(r"model\.layers\.\d+\.", name) for name in placement)  # no block split
    assert all(f"model.layers.{i}" in placement for i in range(tiny_model.config.num_hidden_layers))


def test_a_base_larger_than_the_devices_together_is_refused(tiny_model):
    size = model_bytes(tiny_model)
    with pytest.raises(ValueError, match=r"does not fit the devices' free memory \(\d+ bytes together; '"):
        layer_map(tiny_model, [size // 4, size // 4])


def test_a_placed_model_trains_the_same_lora_and_stays_placed_and_unchanged(tiny_model, tiny_tokenizer):
    examples = [Example(f"Repeat {w}:\n", f"{w} {w} {w}") for w in ("apple", "river", "stone", "cloud")]
    data = tokenize_examples(examples, tiny_tokenizer, cutoff=32, mask_prompt=True)
    config = TrainConfig(rank=4, batch_size=2, max_steps=2, learning_rate=1e-2, device="cpu")
    whole = copy.deepcopy(tiny_model)
    place_layers(tiny_model, ["cpu", "cpu"])
    assert placed_across_devices(tiny_model) and not placed_across_devices(whole)
    before = {name: t.clone() for name, t in tiny_model.state_dict().items()}

    def moved(*args, **kwargs):
        raise AssertionError("a model spread over devices is never moved as a whole")

    tiny_model.to = moved
    placed, reference = train_lora(tiny_model, data, config, val_data=data), train_lora(whole, data, config)
    assert placed.train_loss == reference.train_loss
    for name, (a, b) in reference.adapter.pairs.items():
        assert torch.count_nonzero(b) > 0
        assert torch.equal(placed.adapter.pairs[name].a, a) and torch.equal(placed.adapter.pairs[name].b, b), name
    assert all(torch.equal(t, before[name]) for name, t in tiny_model.state_dict().items())
    assert placed_across_devices(tiny_model) and hasattr(tiny_model.model.layers[0], "_hf_hook")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_devices_this_host_does_not_have_are_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    settings = ClientSettings(name="a", data=[data], devices=["cuda:0", "cuda:1"], shard="layers")
    with pytest.raises(ConfigError, match="--devices: device 'cuda:0' requested but CUDA is not available"):
        load_base(settings, BUILTIN_MODEL)
