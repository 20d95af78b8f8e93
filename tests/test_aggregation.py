"""The aggregation maths: FLoRA is exact for any ranks, the baselines are what they claim."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.common.aggregation import (
    aggregation_error,
    fedit_average,
    flora_stack,
    ideal_delta,
    zeropad_average,
)
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling

SHAPES = {"layer.q": (6, 5), "layer.v": (3, 5)}


def random_adapter(rank: int, alpha: float, rslora: bool, seed: int, shapes=SHAPES) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    pairs = {
        name: LoraPair(torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen))
        for name, (d_out, d_in) in shapes.items()
    }
    return LoraAdapter(pairs, lora_scaling(rank, alpha, rslora))


clients = st.lists(
    st.tuples(
        st.integers(1, 12),  # rank
        st.floats(0.5, 64.0),  # alpha
        st.booleans(),  # rsLoRA
        st.floats(0.05, 1.0),  # raw weight, normalised below
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(clients=clients, seed=st.integers(0, 10_000), d_out=st.integers(1, 9), d_in=st.integers(1, 9))
def test_flora_stacking_is_exact_for_any_mix_of_ranks_alphas_and_weights(clients, seed, d_out, d_in):
    shapes = {"m": (d_out, d_in)}
    adapters = [random_adapter(r, a, rs, seed + k, shapes) for k, (r, a, rs, _) in enumerate(clients)]
    total = sum(w for *_, w in clients)
    weights = [w / total for *_, w in clients]

    # Stacked in float64: any error left is double round-off, however much the clients' updates
    # cancel. (In float32 a cancelling mix can legitimately reach ~1e-6 relative, which is how
    # hypothesis once broke a 1e-6 bound here; float32 exactness is checked against PEFT.)
    stacked = flora_stack(adapters, weights, torch.float64)

    assert stacked.rank == sum(r for r, *_ in clients)
    assert stacked.scaling == 1.0
    assert aggregation_error(stacked, adapters, weights) < 1e-10


def test_flora_float64_reaches_double_round_off():
    adapters = [random_adapter(r, 2 * r, False, r) for r in (16, 8, 4)]
    weights = [0.5, 0.3, 0.2]
    assert aggregation_error(flora_stack(adapters, weights, torch.float64), adapters, weights) < 1e-13


def test_flora_stack_layout_folds_weight_and_scaling_into_a():
    a1 = random_adapter(2, 8.0, False, 1)  # scaling 4
    a2 = random_adapter(3, 3.0, True, 2)  # scaling sqrt(3)
    stacked = flora_stack([a1, a2], [0.25, 0.75])
    a_g, b_g = stacked.pairs["layer.q"]
    torch.testing.assert_close(a_g[:2], a1.pairs["layer.q"].a * 0.25 * 4.0)
    torch.testing.assert_close(a_g[2:], a2.pairs["layer.q"].a * 0.75 * math.sqrt(3.0))
    torch.testing.assert_close(b_g, torch.cat([a1.pairs["layer.q"].b, a2.pairs["layer.q"].b], dim=1))


def test_fedit_has_cross_term_error_when_clients_differ():
    adapters = [random_adapter(4, 8.0, False, seed) for seed in (1, 2, 3)]
    weights = [1 / 3] * 3
    fedit = fedit_average(adapters, weights)
    assert fedit.rank == 4 and fedit.scaling == pytest.approx(2.0)
    assert aggregation_error(fedit, adapters, weights) > 0.1


def test_fedit_counts_every_client_not_only_the_first():
    a1, a2 = random_adapter(2, 4.0, False, 1), random_adapter(2, 4.0, False, 2)
    avg = fedit_average([a1, a2], [0.5, 0.5])
    torch.testing.assert_close(avg.pairs["layer.v"].a, (a1.pairs["layer.v"].a + a2.pairs["layer.v"].a) / 2)
    torch.testing.assert_close(avg.pairs["layer.v"].b, (a1.pairs["layer.v"].b + a2.pairs["layer.v"].b) / 2)


def test_fedit_and_zeropad_are_exact_for_identical_clients():
    one = random_adapter(4, 8.0, False, 7)
    for average in (fedit_average, zeropad_average):
        assert aggregation_error(average([one, one], [0.4, 0.6]), [one, one], [0.4, 0.6]) < 1e-6


def test_fedit_rejects_mixed_ranks_and_scalings():
    with pytest.raises(ValueError, match="same rank"):
        fedit_average([random_adapter(2, 4, False, 1), random_adapter(4, 8, False, 2)], [0.5, 0.5])
    with pytest.raises(ValueError, match="same LoRA scaling"):
        fedit_average([random_adapter(2, 4, False, 1), random_adapter(2, 8, False, 2)], [0.5, 0.5])


def test_zeropad_pads_to_largest_rank_with_one_scaling():
    small, large = random_adapter(2, 4.0, False, 1), random_adapter(4, 8.0, False, 2)  # both scaling 2
    avg = zeropad_average([small, large], [0.5, 0.5])
    assert avg.rank == 4 and avg.scaling == pytest.approx(2.0)
    a = avg.pairs["layer.q"].a
    torch.testing.assert_close(a[:2], (small.pairs["layer.q"].a + large.pairs["layer.q"].a[:2]) / 2)
    torch.testing.assert_close(a[2:], large.pairs["layer.q"].a[2:] / 2)
    assert aggregation_error(avg, [small, large], [0.5, 0.5]) > 0.1


def test_zeropad_rejects_mixed_scalings():
    with pytest.raises(ValueError, match="zeropad requires every client to use the same LoRA scaling"):
        zeropad_average([random_adapter(2, 4, False, 1), random_adapter(4, 4, False, 2)], [0.5, 0.5])


def test_incompatible_updates_are_rejected_with_names():
    good = random_adapter(2, 4, False, 1)
    other_modules = random_adapter(2, 4, False, 2, {"layer.q": (6, 5)})
    other_shape = random_adapter(2, 4, False, 3, {"layer.q": (6, 5), "layer.v": (4, 5)})
    with pytest.raises(ValueError, match="module set differs"):
        flora_stack([good, other_modules], [0.5, 0.5])
    with pytest.raises(ValueError, match="'layer.v'"):
        flora_stack([good, other_shape], [0.5, 0.5])
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        flora_stack([good, good], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        flora_stack([], [])


def test_ideal_delta_is_the_weighted_sum_of_scaled_products():
    a1, a2 = random_adapter(3, 6.0, False, 1), random_adapter(5, 5.0, True, 2)
    expected = 0.3 * a1.scaling * a1.pairs["layer.q"].b @ a1.pairs["layer.q"].a
    expected += 0.7 * a2.scaling * a2.pairs["layer.q"].b @ a2.pairs["layer.q"].a
    torch.testing.assert_close(ideal_delta([a1, a2], [0.3, 0.7], "layer.q"), expected)


def test_aggregation_error_of_all_zero_updates_is_zero():
    zero = LoraAdapter({"m": LoraPair(torch.zeros(2, 3), torch.zeros(4, 2))}, 1.0)
    assert aggregation_error(flora_stack([zero], [1.0]), [zero], [1.0]) == 0.0


def test_lora_adapter_rejects_inconsistent_factors():
    with pytest.raises(ValueError, match="one rank"):
        LoraAdapter({"m": LoraPair(torch.zeros(2, 3), torch.zeros(4, 3))})
    with pytest.raises(ValueError, match="share one rank"):
        LoraAdapter({"m": LoraPair(torch.zeros(2, 3), torch.zeros(4, 2)), "n": LoraPair(torch.zeros(1, 3), torch.zeros(4, 1))})
    with pytest.raises(ValueError, match="at least one module"):
        LoraAdapter({})


@pytest.mark.parametrize(("rank", "alpha", "rslora", "expected"), [(8, 16, False, 2.0), (16, 16, True, 4.0), (4, 1, False, 0.25)])
def test_lora_scaling(rank, alpha, rslora, expected):
    assert lora_scaling(rank, alpha, rslora) == pytest.approx(expected)


@pytest.mark.parametrize(("rank", "alpha"), [(0, 1.0), (4, 0.0), (4, float("nan")), (4, -1.0)])
def test_lora_scaling_rejects_bad_values(rank, alpha):
    with pytest.raises(ValueError):
        lora_scaling(rank, alpha)
