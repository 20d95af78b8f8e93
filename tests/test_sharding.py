"""--shard: when a data-parallel group shards the model (FSDP), and the combinations refused up front."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from fake_coordinator import random_adapter, tiny_spec
from flora.client import cli
from flora.client.config import ClientSettings
from flora.client.local import model_home
from flora.client.local_weights import MergedWeights
from flora.client.round_start import train_round
from flora.client.sharding import ShardedReplicas, group_shards, shards_model
from flora.client.trainer import TrainConfig, train_lora
from flora.common.data import Example, tokenize_examples
from flora.common.devices import model_bytes
from flora.common.methods import ClientStart


def test_full_always_shards_none_never_and_auto_only_a_base_larger_than_a_cuda_device():
    assert shards_model("full", 1, None) and shards_model("full", 1, 10**12)
    assert not shards_model("none", 10**12, 1)
    assert not shards_model("auto", 10**12, None)  # a CPU: never automatic
    assert shards_model("auto", 101, 100) and not shards_model("auto", 100, 100)


def test_model_bytes_are_the_parameters_and_buffers(tiny_model):
    tensors = list(tiny_model.parameters()) + list(tiny_model.buffers())
    assert model_bytes(tiny_model) == sum(t.numel() for t in tensors) * 4  # float32


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    return path


@pytest.mark.parametrize(("values", "message"), [
    ({"shard": "full"}, "shard full splits the model over data-parallel processes: add --nproc N or --devices"),
    ({"shard": "full", "nproc": 2, "quantize": "nf4"}, r"quantize \(nf4\) trains in one: drop --shard full or --quantize"),
    ({"shard": "layers", "devices": ["cpu", "cpu"], "nproc": 2}, "give two or more --devices .* and no --nproc"),
    ({"shard": "layers", "devices": ["cpu"]}, "give two or more --devices"),
    ({"shard": "layers", "devices": ["cpu", "cpu"], "quantize": "int8"}, r"not quantize \(int8\)"),
    ({"shard": "layers", "devices": ["cpu", "cpu"], "device": "cuda:1"}, r"device \(cuda:1\) contradicts shard layers"),
    ({"devices": ["cpu", "cuda:0"]}, "mix the CPU and CUDA"),
    ({"devices": ["cuda:0", "cuda:1", "cuda:0"]}, r"name cuda:0 twice"),  # NCCL refuses two ranks on one GPU
    ({"devices": ["cuda:1", "cuda:1"], "shard": "layers"}, r"name cuda:1 twice"),  # its free memory counted twice
])
def test_combinations_that_cannot_work_are_refused_naming_the_flags(data_file, values, message):
    with pytest.raises(ValueError, match=message):
        ClientSettings(name="a", data=[data_file], **values)


def test_the_cli_refuses_fsdp_with_a_quantized_base_with_exit_status_2(data_file, capsys):
    flags = ["--name", "a", "--data", str(data_file), "--nproc", "2", "--shard", "full", "--quantize", "nf4"]
    assert cli.main(flags) == 2
    assert "drop --shard full or --quantize" in capsys.readouterr().err


def test_the_daemons_copy_stays_on_the_cpu_while_workers_train_and_placed_when_spread(data_file):
    assert model_home(ClientSettings(name="a", data=[data_file], nproc=2, device="cpu")) == torch.device("cpu")
    assert model_home(ClientSettings(name="a", data=[data_file], devices=["cpu", "cpu"], shard="layers")) is None
    layers = ClientSettings(name="a", data=[data_file], devices=["cpu", "cpu"], shard="layers")
    assert (layers.device, layers.training_processes) == ("cpu", 1)  # inputs on the first device, one process


@pytest.fixture()
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture()
def data(tiny_tokenizer):
    examples = [Example(f"Repeat {w}:\n", f"{w} {w}") for w in ("apple", "river", "stone")]
    return tokenize_examples(examples, tiny_tokenizer, cutoff=32, mask_prompt=True)


def test_a_sharded_group_trains_the_lora_one_process_trains(tiny_model, data, one_process_group):
    # The FSDP path in-process (one rank): sharding, the lockstep step, the gathered factors.
    config = TrainConfig(rank=4, batch_size=2, max_steps=2, learning_rate=1e-2, device="cpu")
    sharded_model = copy.deepcopy(tiny_model)
    assert group_shards("auto", sharded_model, torch.device("cpu")) is False
    assert group_shards("full", sharded_model, torch.device("cpu")) is True
    alone = train_lora(tiny_model, data, config)
    sharded = train_lora(sharded_model, data, config, val_data=data, replicas=ShardedReplicas(0, 1))
    units = [m for m in sharded_model.modules() if isinstance(m, FSDPModule)]
    assert len(units) == 1 + sharded_model.config.num_hidden_layers  # one per block, one for the rest
    assert sharded.train_loss == pytest.approx(alone.train_loss, rel=1e-6) and sharded.validation_loss is not None
    for name, (a, b) in alone.adapter.pairs.items():
        a2, b2 = sharded.adapter.pairs[name]
        assert type(a2) is torch.Tensor and a2.shape == a.shape and b2.shape == b.shape
        assert torch.count_nonzero(b) > 0
        assert torch.allclose(a2, a, rtol=0, atol=1e-6) and torch.allclose(b2, b, rtol=0, atol=1e-6), name


def test_a_sharded_group_starts_a_warm_round_as_one_process_does(tiny_model, data, one_process_group):
    # A warm-started method with A frozen (ffa): the kept LoRA removed from the base before sharding.
    spec = tiny_spec()
    names = [m.name for m in spec.target_modules]
    kept = random_adapter(spec, 4, 2.0, seed=3)
    start = ClientStart(init=kept, removed=kept, train_a=False)
    config = TrainConfig(rank=4, batch_size=2, max_steps=2, learning_rate=1e-2, device="cpu", target_modules=tuple(names))
    alone = train_round(MergedWeights(copy.deepcopy(tiny_model), names), data, config, start)
    sharded = train_round(MergedWeights(tiny_model, names), data, config, start, replicas=ShardedReplicas(0, 1))
    assert sharded.train_loss == pytest.approx(alone.train_loss, rel=1e-6)
    for name, (a, b) in alone.adapter.pairs.items():
        assert torch.equal(sharded.adapter.pairs[name].a, a), "A stays the kept one"
        assert torch.allclose(sharded.adapter.pairs[name].b, b, rtol=0, atol=1e-6), name
