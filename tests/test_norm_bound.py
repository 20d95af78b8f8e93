"""change_norm_sq_interval: float32 products whose interval always holds the exact float64 norm;
change_norm_sq_ceiling: sums of squares whose product is never below it."""

from __future__ import annotations

import pytest
import torch

from flora.common import norm_bound
from flora.common.lora import LoraPair
from flora.common.norm_bound import change_norm_sq_ceiling, change_norm_sq_interval
from flora.common.robust import change_norm_sq


def factors(rank: int, d_out: int, d_in: int, seed: int, spread: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors; ``spread`` > 0 scales each entry by 10^U(-spread, spread) (a wide dynamic range)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)
    if spread:
        a = a * 10 ** ((torch.rand(rank, d_in, generator=gen) * 2 - 1) * spread)
        b = b * 10 ** ((torch.rand(d_out, rank, generator=gen) * 2 - 1) * spread)
    return a, b


def assert_holds(a, b, scaling, start=None, start_scaling=1.0, max_width=None) -> None:
    exact = change_norm_sq(a, b, scaling, start, start_scaling)
    interval = change_norm_sq_interval(a, b, scaling, start, start_scaling)
    assert interval is not None
    assert interval.low <= exact <= interval.high
    assert interval.low <= interval.estimate <= interval.high
    if max_width is not None:  # the bound is also tight enough to decide with
        assert interval.high - interval.low <= max_width * exact
    assert change_norm_sq_ceiling(a, b, scaling, start, start_scaling) >= exact


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(4, 64, 48), (16, 256, 128), (1, 3, 5)])  # through the Grams
def test_thin_updates_hold_the_exact_norm_in_a_narrow_interval(shape, seed) -> None:
    a, b = factors(*shape, seed)
    assert_holds(a, b, 0.5 + seed, max_width=1e-2)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(40, 8, 6), (500, 16, 12)])  # rank^2 > d_out d_in: through the product
def test_wide_updates_hold_the_exact_norm_in_a_narrow_interval(shape, seed) -> None:
    a, b = factors(*shape, seed)
    assert_holds(a, b, 2.0, max_width=1e-2)


@pytest.mark.parametrize("shape", [(8, 64, 48), (40, 8, 6)])
@pytest.mark.parametrize("seed", range(5))
def test_a_wide_dynamic_range_still_holds(shape, seed) -> None:
    a, b = factors(*shape, seed, spread=6.0)
    assert_holds(a, b, 1.0)


@pytest.mark.parametrize("shape", [(8, 64, 48), (40, 8, 6)])
@pytest.mark.parametrize("seed", range(5))
def test_a_change_that_nearly_cancels_its_start_still_holds(shape, seed) -> None:
    a0, b0 = factors(*shape, seed)
    da, db = factors(*shape, seed + 100)
    a, b = a0 + 1e-4 * da, b0 + 1e-4 * db  # the change is ~1e-4 of the start: float32 loses most of it
    start = LoraPair(a0.double(), b0.double())  # the server's start may be float64; the cast is covered
    assert_holds(a, b, 0.25, start, 0.25)


def test_a_fresh_change_against_a_zero_start_matches_the_fresh_interval() -> None:
    a, b = factors(4, 32, 16, 0)
    start = LoraPair(torch.zeros(4, 16), torch.zeros(32, 4))
    assert_holds(a, b, 2.0, start, 2.0, max_width=1e-2)


def test_tiny_values_that_underflow_in_float32_still_hold() -> None:
    a, b = factors(4, 64, 48, 1)
    assert_holds(a * 1e-22, b * 1e-22, 1.0)  # products ~1e-44: float32 subnormals
    assert_holds(a * 1e-40, b, 1.0)


@pytest.mark.parametrize("shape", [(4, 64, 48), (40, 8, 6)])
def test_a_float32_overflow_gives_no_interval(shape) -> None:
    a, b = factors(*shape, 0)
    assert change_norm_sq_interval(a * 1e25, b * 1e25, 1.0) is None


def test_a_zero_update_is_exactly_zero() -> None:
    interval = change_norm_sq_interval(torch.zeros(4, 16), torch.zeros(32, 4), 3.0)
    assert (interval.low, interval.estimate) == (0.0, 0.0) and interval.high < 1e-60


@pytest.mark.parametrize("shape", [(4, 64, 48), (12, 1, 100)])  # the Grams; the product, rows of 100 but k = 12
def test_rows_too_long_for_the_rounding_bound_give_no_interval(shape, monkeypatch) -> None:
    """n u >= 1/2 leaves gamma_n unbounded: no interval (the exact computation decides), never a
    collapsed one that would clear any limit. A coarse unit roundoff (64 n u >= 1/2 for n >= 32)
    makes the rows too long where the rank is not."""
    monkeypatch.setattr(norm_bound, "UNIT_ROUNDOFF", 2.0**-6)
    a, b = factors(*shape, 0)
    assert change_norm_sq_interval(a, b, 1.0) is None


def test_the_ceiling_of_a_rank_one_update_is_its_norm() -> None:
    """|b a^T|_F = |b| |a|: there the ceiling is exact up to rounding, so it cannot be loose by
    more than the rounding allows (a ceiling off by a factor, say a missing scaling, fails)."""
    a, b = factors(1, 64, 48, 3)
    exact = change_norm_sq(a, b, 0.75, None, 1.0)
    assert exact <= change_norm_sq_ceiling(a, b, 0.75) <= exact * (1 + 1e-5)


def test_the_ceiling_counts_the_start() -> None:
    """Against a start the ceiling is (|B|^2 + |B0|^2)(s^2 |A|^2 + s0^2 |A0|^2): a change that
    cancels its start exactly still has the start's part in its ceiling."""
    a, b = factors(1, 16, 8, 4)
    ceiling = change_norm_sq_ceiling(a, b, 1.0, LoraPair(a, b), 1.0)
    sq = float(a.double().square().sum()) * float(b.double().square().sum())
    assert change_norm_sq(a, b, 1.0, LoraPair(a, b), 1.0) == 0.0
    assert ceiling == pytest.approx(4 * sq, rel=1e-5)


@pytest.mark.parametrize("shape", [(4, 64, 48), (40, 8, 6)])
def test_a_float32_overflow_gives_an_infinite_ceiling(shape) -> None:
    a, b = factors(*shape, 0)
    assert change_norm_sq_ceiling(a * 1e25, b, 1.0) == float("inf")


def test_rows_too_long_for_the_rounding_bound_give_an_infinite_ceiling(monkeypatch) -> None:
    monkeypatch.setattr(norm_bound, "UNIT_ROUNDOFF", 2.0**-6)
    a, b = factors(4, 64, 48, 0)
    assert change_norm_sq_ceiling(a, b, 1.0) == float("inf")
