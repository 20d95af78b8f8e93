"""Fixed point mod 2^64: exact round trips, two's complement, no wrap at K clients all at the
bound, and a scale refused where none can be both wrap-free and finer than float32."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flora.common.secagg.fixedpoint import (
    FLOAT32_ROUNDOFF, HEADROOM_BITS, check_sum, choose_scale, decode, encode, max_clients, resolution, wrapping_sum,
)


@pytest.mark.parametrize("bound", [1e-3, 1.0, 7.5, 1e4])
@pytest.mark.parametrize("clients", [1, 3, 100, 100_000])
def test_the_chosen_scale_is_the_finest_that_cannot_wrap_and_finer_than_float32(bound, clients):
    bits = choose_scale(bound, clients)
    assert clients * (math.ldexp(bound, bits) + 0.5) <= 2.0**HEADROOM_BITS  # no wrap, rounding counted
    assert clients * (math.ldexp(bound, bits + 1) + 0.5) > 2.0**HEADROOM_BITS  # the largest such
    assert resolution(bits, clients) <= FLOAT32_ROUNDOFF * bound


def test_round_trip_is_within_half_a_step_and_negatives_are_twos_complement():
    bits = choose_scale(2.0, 10)
    values = np.random.default_rng(0).uniform(-2.0, 2.0, size=(30, 7))
    encoded = encode(values, bits)
    assert encoded.dtype == np.uint64 and encoded.shape == (210,)
    assert np.max(np.abs(decode(encoded, bits) - values.reshape(-1))) <= math.ldexp(0.5, -bits)
    step = math.ldexp(1.0, -bits)
    assert encode(np.array([-step, 0.0, step]), bits).tolist() == [2**64 - 1, 0, 1]


@pytest.mark.parametrize("clients", [3, 100, 10_000])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_k_clients_all_at_the_bound_sum_without_wrapping(clients, sign):
    bound = 3.0
    bits = choose_scale(bound, clients)
    row = sign * np.array([bound, bound, -bound, bound * (1 - 1e-12)])
    total = decode(wrapping_sum([encode(row, bits)] * clients), bits)
    assert np.max(np.abs(total - clients * row)) <= resolution(bits, clients)
    assert np.all(np.sign(total) == np.sign(row))


def test_sums_of_mixed_signs_are_exact_to_the_resolution():
    rng = np.random.default_rng(1)
    bits = choose_scale(1.0, 50)
    rows = [rng.uniform(-1, 1, size=64) for _ in range(50)]
    total = decode(wrapping_sum([encode(r, bits) for r in rows]), bits)
    exact = np.array([math.fsum(column) for column in zip(*rows)])
    float64_roundoff = 2.0**-52 * np.abs(exact)  # the decoded float64 itself; the integers are finer
    assert np.all(np.abs(total - exact) <= resolution(bits, 50) + float64_roundoff)


@pytest.mark.parametrize("bound", [0.0, -1.0, math.inf, math.nan])
def test_a_bound_that_is_not_positive_and_finite_is_refused(bound):
    with pytest.raises(ValueError, match="bound must be a positive finite number"):
        choose_scale(bound, 3)


@pytest.mark.parametrize("bound", [1e-300, 5e-324])
def test_a_bound_too_small_for_any_float64_scale_is_refused_by_name(bound):
    """2^62 / (K B) overflows float64 below about 1e-290: a ValueError naming the bound, not an
    OverflowError from the arithmetic."""
    with pytest.raises(ValueError, match="bound .* is too small for a fixed-point scale"):
        choose_scale(bound, 3)


@pytest.mark.parametrize("clients", [0, -2, 2.5, True])
def test_a_client_count_that_is_not_a_positive_integer_is_refused(clients):
    with pytest.raises(ValueError, match="clients must be an integer >= 1"):
        choose_scale(1.0, clients)


def test_too_many_clients_for_float32_resolution_are_refused_with_the_arithmetic():
    assert choose_scale(1.0, max_clients() // 2) > 0
    with pytest.raises(ValueError, match=r"clients 2097152 too many .* coarser than float32 round-off"):
        choose_scale(1.0, 2**21)


@pytest.mark.parametrize("bound", [1.0, 1.0 - 2.0**-50, 1.3, 4.0, 7.5, 1e-3])
def test_the_client_count_the_refusal_names_fits_at_any_bound(bound):
    """The refusal's "at most N clients fit" holds at every bound: the largest f is floor(log2 of
    the room), which costs up to one bit, so N is 2^19 - 1 (K^2 < 2^38), not sqrt(2^39)."""
    assert choose_scale(bound, max_clients()) >= 0
    with pytest.raises(ValueError, match=f"at most {max_clients():,} clients fit at any bound"):
        choose_scale(bound, 2**21)


def test_encode_refuses_non_finite_values_and_values_beyond_the_range():
    bits = choose_scale(1.0, 4)
    with pytest.raises(ValueError, match="must be finite"):
        encode(np.array([0.0, math.nan]), bits)
    with pytest.raises(ValueError, match="exceeds the fixed-point range"):
        encode(np.array([math.ldexp(1.0, HEADROOM_BITS - bits + 1)]), bits)


def test_check_sum_accepts_the_bound_and_refuses_beyond_it():
    bits, clients = choose_scale(1.0, 4), 4
    total = np.full(16, 0.25)  # norm 1.0
    check_sum(total, 1.0, bits, clients)
    with pytest.raises(ValueError, match="sum norm 2 exceeds the announced bound"):
        check_sum(2 * total, 1.0, bits, clients)
    with pytest.raises(ValueError, match="outside the announced range"):
        check_sum(np.array([math.ldexp(1.0, HEADROOM_BITS - bits + 1)]), 1e30, bits, clients)


def test_under_dp_a_sum_out_of_range_is_refused_naming_the_check_and_its_limit_only():
    """Under differential privacy the sum checked is the noiseless one: its norm or largest entry
    must not reach the log or the history's exclusion reasons (issue 31)."""
    bits, clients = choose_scale(1.0, 4), 4
    total = np.full(16, 0.3125)  # norm 1.25
    allowed = 1.0 + 4 * resolution(bits, clients)
    with pytest.raises(ValueError) as refused:
        check_sum(total, 1.0, bits, clients, private=True)
    assert str(refused.value) == f"secure aggregation: sum norm exceeds the announced bound {allowed:.6g}"
    entry = math.ldexp(1.0, HEADROOM_BITS - bits + 1)
    limit = math.ldexp(1.0, HEADROOM_BITS - bits)
    with pytest.raises(ValueError) as refused:
        check_sum(np.array([entry]), 1e30, bits, clients, private=True)
    assert str(refused.value).startswith(f"secure aggregation: sum entry outside the announced range +-{limit:.6g}")
    with pytest.raises(ValueError) as refused:
        encode(np.array([1.5 * entry]), bits)
    assert f"{1.5 * entry:.6g}" not in str(refused.value) and "exceeds the fixed-point range" in str(refused.value)


def test_the_servers_noisy_release_checks_its_sum_privately():
    import torch

    from flora.common.methods import get_method
    from flora.common.secagg.finish import Noise, released_sum
    from flora.common.secagg.plan import plan_round, vector_length

    plan = plan_round(get_method("flora"), None, {"m": (8, 6)}, [2, 2], [1.0, 1.0], [0.5, 0.5], None, 7, dp_clip_norm=0.5)
    summed = encode(np.full(vector_length(plan, 1), 0.5), plan.bits)  # far above the bound 0.5
    norm = f"{0.5 * math.sqrt(vector_length(plan, 1)):.6g}"
    with pytest.raises(ValueError, match=f"sum norm {norm} exceeds"):  # without noise: the server's own sum, said
        released_sum(plan, 1, summed)
    with pytest.raises(ValueError, match="sum norm exceeds the announced bound") as refused:
        released_sum(plan, 1, summed, Noise(1.0, torch.Generator().manual_seed(0)))
    assert norm not in str(refused.value)
