"""One lying client of four, on the seeded tiny Llama (the built-in before pre-training): clipping keeps the global model near the honest run.

Three clients train honestly; the fourth uploads its update scaled up 1,000x (or replaced by random
noise of that size). The aggregate is built exactly as the server builds it
(``robust_inputs`` then flora's ``merge`` with the clip factors) and merged into the model; its validation loss is compared
with the honest run's (the attacker replaced by an honest update).
"""

from __future__ import annotations

import pytest
import torch

from flora.client.trainer import TrainConfig, train_lora
from flora.common.basemodel import build_tiny_llama
from flora.common.data import Example, tokenize_examples
from flora.common.evaluate import evaluate_loss
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.merge import merged_temporarily
from flora.common.methods import get_method
from flora.common.robust import RobustPolicy, robust_inputs, update_norm

pytestmark = pytest.mark.slow

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "forest", "candle", "harbor", "maple", "rocket"]
MARGIN = 0.03  # nats: "within a small margin of the honest run" (training gains about 0.5 over the base)
HARM = 0.1  # nats: what one liar costs an undefended round at least (the tiny model saturates beyond)


def _examples(tokenizer, words):
    return tokenize_examples([Example(f"Repeat {w}:\n", " ".join([w] * 4)) for w in words], tokenizer,
                             cutoff=48, mask_prompt=True)


def _noise_like(adapter: LoraAdapter, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    return LoraAdapter({n: LoraPair(torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen))
                        for n, (a, b) in adapter.pairs.items()}, adapter.scaling)


def _scaled_to(adapter: LoraAdapter, norm: float) -> LoraAdapter:
    factor = norm / update_norm(adapter)
    return LoraAdapter({n: LoraPair(a * factor, b) for n, (a, b) in adapter.pairs.items()}, adapter.scaling)


@pytest.fixture(scope="module")
def round_updates(tiny_tokenizer):
    # The seeded tiny Llama before pre-training, on which MARGIN and HARM were set: the shipped
    # pre-trained built-in sits where a norm-2x-median noise update costs more than 0.03 nats.
    model = build_tiny_llama(len(tiny_tokenizer))
    validation = _examples(tiny_tokenizer, WORDS)
    updates = []
    for k in range(4):
        config = TrainConfig(rank=4, batch_size=4, max_steps=12, learning_rate=2e-2, device="cpu", seed=k)
        result = train_lora(model, _examples(tiny_tokenizer, WORDS[3 * k: 3 * k + 3] + WORDS[:2]), config)
        updates.append(result.adapter)
    return model, validation, updates


def _loss(model, validation, updates, policy) -> float:
    adapters, weights, clips, _ = robust_inputs(updates, [None] * 4, [0.25] * 4, policy)  # fresh starts
    with merged_temporarily(model, get_method("flora").merge(None, adapters, weights, clips=clips).delta):
        return evaluate_loss(model, validation, batch_size=8, device=torch.device("cpu"))


@pytest.mark.parametrize("attack", ["scaled", "noise"])
def test_clipping_keeps_one_liar_from_ruining_the_round(round_updates, attack):
    model, validation, updates = round_updates
    honest = _loss(model, validation, updates, RobustPolicy(max_weight_share=None))
    big = 1000 * update_norm(updates[3])
    liar = updates[3].__class__(updates[3].pairs, updates[3].scaling * 1000) if attack == "scaled" else \
        _scaled_to(_noise_like(updates[3], 7), big)
    attacked = updates[:3] + [liar]
    undefended = _loss(model, validation, attacked, RobustPolicy(max_weight_share=None))
    clipped = _loss(model, validation, attacked, RobustPolicy(max_weight_share=None, clip_median_multiple=2.0))
    rejected = _loss(model, validation, attacked, RobustPolicy(max_weight_share=None, reject_median_multiple=5.0))
    assert undefended > honest + HARM, (honest, undefended)  # the liar alone ruins an undefended round
    assert clipped < honest + MARGIN, (honest, clipped)
    assert rejected < honest + MARGIN, (honest, rejected)
