"""The robustness maths (flora.common.robust) against dense float64 oracles."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.common.aggregation import flora_stack
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import get_method
from flora.common.robust import RobustPolicy, cap_shares, change_norm, decide, delta_norm_sq, update_norm


def _adapter(seed: int, rank: int, scaling: float = 2.0, scale: float = 1.0) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    pairs = {f"m{i}": LoraPair(torch.randn(rank, 12, generator=gen) * scale, torch.randn(9, rank, generator=gen) * scale)
             for i in range(3)}
    return LoraAdapter(pairs, scaling)


def _dense_norm(adapter: LoraAdapter) -> float:
    total = 0.0
    for a, b in adapter.pairs.values():
        total += float(torch.linalg.matrix_norm(adapter.scaling * b.double() @ a.double())) ** 2
    return math.sqrt(total)


@pytest.mark.parametrize("rank", [1, 3, 8, 20])
def test_gram_norm_equals_the_dense_norm(rank):
    adapter = _adapter(rank, rank)
    assert update_norm(adapter) == pytest.approx(_dense_norm(adapter), rel=1e-12)


@pytest.mark.parametrize("rank", [3, 40])  # thinner than the 8 x 6 module (Grams), and wider (the product)
def test_update_norm_equals_the_norm_of_the_weight_change_at_any_rank(rank):
    gen = torch.Generator().manual_seed(rank)
    a, b = torch.randn(rank, 6, generator=gen), torch.randn(8, rank, generator=gen)
    expected = float(torch.linalg.matrix_norm(0.5 * (b.double() @ a.double())))
    assert math.sqrt(delta_norm_sq(a, b, 0.5)) == pytest.approx(expected, rel=1e-9)


def test_norm_of_a_rank_far_above_the_module_size_needs_no_rank_squared_memory():
    import tracemalloc

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 8, generator=gen), torch.randn(8, 2000, generator=gen)
    tracemalloc.start()
    try:
        norm_sq = delta_norm_sq(a, b, 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert norm_sq == pytest.approx(float(torch.linalg.matrix_norm(0.5 * b.double() @ a.double())) ** 2, rel=1e-12)
    assert peak < 4 << 20  # the two (2000, 2000) float64 Grams alone would be 64 MB


def test_gram_norm_does_not_overflow_where_float32_products_do():
    a = torch.full((4, 16), 1e23)
    b = torch.full((16, 4), 1e23)
    assert not torch.isfinite(b @ a).all()  # the merge would overflow
    expected = 4 * 1e46 * 16 * 2.0  # every entry of B A is 4e46; 256 entries; s = 2
    assert math.sqrt(delta_norm_sq(a, b, 2.0)) == pytest.approx(expected, rel=1e-6)


def test_clipping_scales_the_stacked_delta_exactly():
    adapters = [_adapter(1, 2), _adapter(2, 5)]
    stacked = get_method("flora").merge(None, adapters, [0.5, 0.5], torch.float64, clips=[0.25, 1.0]).delta
    for name in adapters[0].pairs:
        want = 0.5 * 0.25 * adapters[0].delta(name, torch.float64) + 0.5 * adapters[1].delta(name, torch.float64)
        assert torch.allclose(stacked.delta(name, torch.float64), want, rtol=1e-12, atol=1e-12)
    unclipped = get_method("flora").merge(None, adapters, [0.5, 0.5], torch.float64).delta
    for name in adapters[0].pairs:  # fresh-start flora without clips: the plain stack, as before
        plain = flora_stack(adapters, [0.5, 0.5], torch.float64)
        assert torch.equal(unclipped.delta(name, torch.float64), plain.delta(name, torch.float64))


@pytest.mark.parametrize("rank, start_rank", [(3, 3), (2, 5), (20, 4)])  # Grams, and a product past the module size
def test_change_norm_is_the_norm_of_the_dense_change(rank, start_rank):
    update, start = _adapter(3, rank, scaling=2.0), _adapter(4, start_rank, scaling=0.5)
    want = math.sqrt(sum(float(torch.linalg.matrix_norm(update.delta(n, torch.float64) - start.delta(n, torch.float64))) ** 2
                         for n in update.pairs))
    assert change_norm(update, start) == pytest.approx(want, rel=1e-9)
    assert change_norm(update, None) == pytest.approx(_dense_norm(update), rel=1e-12)
    assert change_norm(update, update) < 1e-7 * _dense_norm(update)  # Grams in float64: sqrt(eps) of |u|, cancelled


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0.0, 1e9), min_size=3, max_size=12).filter(lambda w: sum(w) > 0),
       st.floats(0.05, 1.0))
def test_capped_shares_sum_to_one_and_respect_the_cap(weights, cap):
    if cap * len(weights) < 1:
        with pytest.raises(ValueError):
            cap_shares(weights, cap)
        return
    shares = cap_shares(weights, cap)
    assert math.fsum(shares) == pytest.approx(1.0, abs=1e-9)
    assert max(shares) <= cap + 1e-9
    total = sum(weights)
    for w, p in zip(weights, shares):
        assert p >= 0
        if w / total <= cap:  # a weight under the cap only ever grows
            assert p >= w / total - 1e-9


def test_one_inflated_claim_gets_at_most_the_cap():
    decisions = decide([1.0, 1.0, 1.0, 1.0], [1e9, 10, 10, 10], RobustPolicy(max_weight_share=0.5))
    assert decisions[0].weight == pytest.approx(0.5)
    assert decisions[0].capped and not decisions[1].capped
    assert [d.weight for d in decisions[1:]] == pytest.approx([1 / 6] * 3)


def test_no_cap_with_two_clients():
    decisions = decide([1.0, 1.0], [0.9, 0.1], RobustPolicy(max_weight_share=0.5))
    assert [d.weight for d in decisions] == pytest.approx([0.9, 0.1])


def test_adaptive_and_fixed_clipping_take_the_tighter_bound():
    norms = [1.0, 2.0, 3.0, 300.0]
    decisions = decide(norms, [0.25] * 4, RobustPolicy(max_weight_share=None, clip_median_multiple=2.0))
    assert [d.clip_factor for d in decisions] == pytest.approx([1.0, 1.0, 1.0, 5.0 / 300.0])  # median 2.5
    decisions = decide(norms, [0.25] * 4, RobustPolicy(max_weight_share=None, clip_norm=1.5, clip_median_multiple=2.0))
    assert [d.clip_factor for d in decisions] == pytest.approx([1.0, 0.75, 0.5, 1.5 / 300.0])


def test_outliers_are_rejected_and_weights_renormalised():
    decisions = decide([1.0, 1.1, 0.9, 50.0], [0.25] * 4, RobustPolicy(max_weight_share=None, reject_median_multiple=3.0))
    assert [d.rejected for d in decisions] == [False, False, False, True]
    assert [d.weight for d in decisions] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
