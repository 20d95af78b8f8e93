"""Local LoRA training: it learns, returns the right factors, and leaves the caller's model alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path
from peft.tuners.lora import LoraLayer
from pydantic import ValidationError

from flora.client.trainer import (
    TrainConfig,
    TrainingCancelled,
    lr_at,
    total_steps,
    train_lora,
)
from flora.common.basemodel import load_model, load_tokenizer, target_module_shapes
from flora.common.data import Example, collate, load_examples, tokenize_examples
from flora.common.devices import resolve_device
from flora.common.evaluate import evaluate_loss
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling

WORDS = ["apple", "river", "stone", "cloud", "ember", "frost", "grove", "harbor", "island", "jungle"]


@pytest.fixture(scope="module")
def data(tiny_tokenizer):
    """Ten learnable examples of different lengths, prompt masked."""
    examples = [Example(f"Repeat {w}:\n", " ".join([w] * (2 + i % 4))) for i, w in enumerate(WORDS)]
    return tokenize_examples(examples, tiny_tokenizer, cutoff=64, mask_prompt=True)


def config(**overrides) -> TrainConfig:
    defaults = {"rank": 4, "batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "device": "cpu"}
    return TrainConfig(**{**defaults, **overrides})


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": {name: m for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": model.training,
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][k] is m for k, m in before["modules"].items())  # the very same objects
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert not hasattr(model, "peft_config")


def apply(model: torch.nn.Module, adapter: LoraAdapter) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in adapter.module_names:
            modules[name].weight += adapter.delta(name)


# --- training ----------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_the_adapter_reproduces_it(tiny_model, data) -> None:
    before = evaluate_loss(tiny_model, data)
    result = train_lora(tiny_model, data, config(max_steps=30), val_data=data)
    assert result.validation_loss < before - 0.5
    assert result.train_loss < before
    apply(tiny_model, result.adapter)  # names, orientation and scaling must all be right for this
    assert evaluate_loss(tiny_model, data) == pytest.approx(result.validation_loss, rel=1e-4)


def test_adapter_has_declared_rank_names_shapes_and_scaling(tiny_model, data) -> None:
    targets = ("q_proj", "k_proj", "o_proj")
    result = train_lora(tiny_model, data, config(rank=3, alpha=5.0, rslora=True, target_modules=targets))
    shapes = target_module_shapes(tiny_model, targets)
    adapter = result.adapter
    assert adapter.module_names == sorted(shapes) and adapter.module_names[0] == "model.layers.0.self_attn.k_proj"
    assert adapter.rank == 3 and adapter.scaling == lora_scaling(3, 5.0, rslora=True)
    for name, (d_out, d_in) in shapes.items():
        a, b = adapter.pairs[name]
        assert a.shape == (3, d_in) and b.shape == (d_out, 3)
        assert a.dtype == b.dtype == torch.float32 and a.device.type == b.device.type == "cpu"
        assert b.abs().sum() > 0  # B left zero means nothing was trained


def test_callers_model_is_left_exactly_as_it_was(tiny_model, data) -> None:
    tiny_model.model.embed_tokens.weight.requires_grad_(False)
    before = snapshot(tiny_model)
    train_lora(tiny_model, data, config(), val_data=data)
    assert_unchanged(tiny_model, before)
    tiny_model.train()
    before = snapshot(tiny_model)
    train_lora(tiny_model, data, config())
    assert_unchanged(tiny_model, before)


def test_gradient_checkpointing_trains_the_same_factors_and_is_switched_off_after(tiny_model, data) -> None:
    plain = train_lora(tiny_model, data, config(seed=3, max_steps=3)).adapter
    checkpointed = train_lora(tiny_model, data, config(seed=3, max_steps=3, gradient_checkpointing=True)).adapter
    for name, (a, b) in plain.pairs.items():
        torch.testing.assert_close(checkpointed.pairs[name].a, a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(checkpointed.pairs[name].b, b, rtol=1e-4, atol=1e-6)
    assert not tiny_model.is_activation_checkpointing


def test_gradient_checkpointing_on_a_model_without_it_is_a_clear_error(data) -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="gradient_checkpointing: Plain does not support it"):
        train_lora(Plain(), data, config(target_modules=("q_proj",), gradient_checkpointing=True))


def test_counts_in_epoch_mode(tiny_model, data) -> None:
    progress = []
    cfg = config(max_steps=0, epochs=2, batch_size=4, grad_accum=2)  # 3 micro-batches an epoch
    result = train_lora(tiny_model, data, cfg, on_step=lambda *args: progress.append(args))
    assert result.steps == total_steps(len(data), cfg) == 3
    assert result.tokens == 2 * sum(len(x) for x in data)
    assert result.num_examples == len(data)
    assert [p[:2] for p in progress] == [(1, 3), (2, 3), (3, 3)]
    assert result.train_loss == pytest.approx(sum(p[2] for p in progress) / 3)


def test_same_seed_gives_identical_factors(tiny_model, data) -> None:
    first = train_lora(tiny_model, data, config(seed=5)).adapter
    torch.manual_seed(1234)  # the global RNG must not matter
    torch.rand(10)
    second = train_lora(tiny_model, data, config(seed=5)).adapter
    other = train_lora(tiny_model, data, config(seed=6)).adapter
    for name, (a, b) in first.pairs.items():
        assert torch.equal(a, second.pairs[name].a) and torch.equal(b, second.pairs[name].b)
    assert any(not torch.equal(a, other.pairs[name].a) for name, (a, _) in first.pairs.items())


def test_gradient_accumulation_weights_tokens_not_batches(tiny_model, data) -> None:
    def run(batch_size: int, grad_accum: int):
        losses = []
        cfg = config(batch_size=batch_size, grad_accum=grad_accum, max_steps=2)
        adapter = train_lora(tiny_model, data, cfg, on_step=lambda s, t, loss: losses.append(loss)).adapter
        return losses, adapter

    whole_losses, whole = run(4, 1)
    split_losses, split = run(2, 2)  # the same four examples per step, in two unequal halves
    assert split_losses == pytest.approx(whole_losses, rel=1e-5)
    for name, (a, b) in whole.pairs.items():
        assert torch.allclose(a, split.pairs[name].a, atol=1e-5) and torch.allclose(b, split.pairs[name].b, atol=1e-5)


def test_should_stop_cancels_and_restores_the_model(tiny_model, data) -> None:
    before = snapshot(tiny_model)
    progress = []
    with pytest.raises(TrainingCancelled):
        train_lora(
            tiny_model, data, config(max_steps=10),
            on_step=lambda *args: progress.append(args), should_stop=lambda: len(progress) >= 2,
        )
    assert [p[:2] for p in progress] == [(1, 10), (2, 10)]
    assert not any(isinstance(m, LoraLayer) for m in tiny_model.modules())
    assert_unchanged(tiny_model, before)


def test_empty_training_data_is_rejected(tiny_model) -> None:
    with pytest.raises(ValueError, match="no training examples"):
        train_lora(tiny_model, [], config())


# --- starting from a given adapter -------------------------------------------------------------


def random_adapter(model: torch.nn.Module, rank: int, scaling: float, seed: int = 0) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    shapes = target_module_shapes(model, ("q_proj", "v_proj"))
    return LoraAdapter(
        {
            n: LoraPair(torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator))
            for n, (d_out, d_in) in shapes.items()
        },
        scaling,
    )


def barely_trained(rank: int) -> TrainConfig:
    return config(rank=rank, max_steps=1, learning_rate=1e-9, max_grad_norm=0.0, schedule="constant")


def test_init_from_larger_rank_takes_leading_rows_and_columns(tiny_model, data) -> None:
    cfg = barely_trained(4)
    init = random_adapter(tiny_model, rank=6, scaling=cfg.scaling)
    result = train_lora(tiny_model, data, cfg, init=init)
    for name, (a, b) in init.pairs.items():
        assert torch.allclose(result.adapter.pairs[name].a, a[:4], atol=1e-6)
        assert torch.allclose(result.adapter.pairs[name].b, b[:, :4], atol=1e-6)


def test_init_with_other_scaling_keeps_its_update(tiny_model, data) -> None:
    cfg = barely_trained(4)
    init = random_adapter(tiny_model, rank=4, scaling=0.5)
    adapter = train_lora(tiny_model, data, cfg, init=init).adapter
    assert adapter.scaling == cfg.scaling != init.scaling
    for name in init.module_names:
        assert torch.allclose(adapter.delta(name), init.delta(name), rtol=1e-4, atol=1e-5)


def test_unusable_init_is_rejected_and_the_model_restored(tiny_model, data) -> None:
    before = snapshot(tiny_model)
    smaller = random_adapter(tiny_model, rank=2, scaling=1.0)
    with pytest.raises(ValueError, match="smaller than"):
        train_lora(tiny_model, data, config(rank=4), init=smaller)
    other_modules = LoraAdapter(dict(list(random_adapter(tiny_model, 4, 1.0).pairs.items())[:3]), 1.0)
    with pytest.raises(ValueError, match="do not match"):
        train_lora(tiny_model, data, config(rank=4), init=other_modules)
    assert_unchanged(tiny_model, before)


# --- evaluation --------------------------------------------------------------------------------


def test_evaluate_loss_is_token_weighted(tiny_model, tiny_tokenizer) -> None:
    examples = [Example("", "a"), Example("", "a much longer response " * 4), Example("", "mid length")]
    data = tokenize_examples(examples, tiny_tokenizer)
    sums, counts = [], []
    with torch.no_grad():
        for example in data:
            ids = torch.tensor([example.input_ids])
            logits = tiny_model(input_ids=ids).logits[0, :-1]
            sums.append(float(F.cross_entropy(logits, ids[0, 1:], reduction="sum")))
            counts.append(len(example) - 1)
    expected = sum(sums) / sum(counts)
    assert abs(expected - sum(s / c for s, c in zip(sums, counts)) / 3) > 1e-3  # the two means differ here
    tiny_model.train()
    for batch_size in (1, 2, 3):  # padding and batching must not change the result
        assert evaluate_loss(tiny_model, data, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    assert tiny_model.training


def test_evaluate_loss_skips_masked_labels(tiny_model, tiny_tokenizer) -> None:
    examples = [Example("a long prompt that is masked\n", "yes")]
    masked = tokenize_examples(examples, tiny_tokenizer, mask_prompt=True)
    labels = collate(masked)["labels"]
    ids = torch.tensor([masked[0].input_ids])
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits[0, :-1]
    expected = F.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
    assert evaluate_loss(tiny_model, masked) == pytest.approx(float(expected), rel=1e-5)


# --- configuration and schedule ----------------------------------------------------------------


def test_learning_rate_schedule() -> None:
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=4, schedule="cosine")
    rates = [lr_at(step, 10, cfg) for step in range(10)]
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(x > y > 0 for x, y in zip(rates[4:], rates[5:]))
    assert rates[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    constant = cfg.model_copy(update={"schedule": "constant"})
    assert [lr_at(s, 10, constant) for s in range(4, 10)] == [1.0] * 6


def test_train_config_defaults_and_limits() -> None:
    cfg = TrainConfig(rank=16)
    assert cfg.lora_alpha == 32.0 and cfg.scaling == 2.0 and cfg.target_modules is None  # the family's default
    assert TrainConfig(rank=16, alpha=4, rslora=True).scaling == 1.0
    for bad in ({"rank": 0}, {"alpha": 0}, {"device": "gpu"}, {"dtype": "fp8"}, {"target_modules": []}, {"epochs": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            TrainConfig(**bad)
    with pytest.raises(ValidationError, match="learning_rat"):
        TrainConfig(learning_rat=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.shared
def test_trains_a_real_model_with_a_padless_tokenizer() -> None:
    model_dir = str(shared_path("models", "stories260K"))
    examples = load_examples(shared_path("data", "dolly-10clients", "local_training_3.json"))[:16]
    data = tokenize_examples(examples, load_tokenizer(model_dir), cutoff=96)
    model = load_model(model_dir)
    result = train_lora(model, data, config(max_steps=2), val_data=data[:4])
    assert result.adapter.module_names == sorted(target_module_shapes(model, ("q_proj", "v_proj")))
    assert math.isfinite(result.train_loss) and math.isfinite(result.validation_loss)
