"""Canonical factors: exact, a function of the sum alone, best rank-k by their leading rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.common.aggregation import flora_stack
from flora.common import canonical
from flora.common.canonical import canonical_pair, singular_values
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling


def client_updates(ranks: list[int], d_out: int, d_in: int, seed: int) -> tuple[list[LoraAdapter], list[float]]:
    """Random heterogeneous clients (ranks, alphas, rsLoRA) and normalised weights."""
    gen = torch.Generator().manual_seed(seed)
    adapters = []
    for k, rank in enumerate(ranks):
        pair = LoraPair(torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen))
        adapters.append(LoraAdapter({"m": pair}, lora_scaling(rank, 2.0 + 3 * k, rslora=k % 2 == 1)))
    raw = torch.rand(len(ranks), generator=gen) + 0.1
    return adapters, (raw / raw.sum()).tolist()


def stacked(ranks: list[int], d_out: int, d_in: int, seed: int) -> LoraPair:
    adapters, weights = client_updates(ranks, d_out, d_in, seed)
    return flora_stack(adapters, weights, torch.float64).pairs["m"]


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y)).item()


def same_sum_other_clients(pair: LoraPair, ranks: list[int], seed: int) -> LoraPair:
    """A different stack (other ranks, other factors) whose product is the same B A.

    B A = (B M)(N A) for any M (R x R') and N (R' x R) with M N = I; the R' columns of B M are
    then cut into clients of the given ranks, with random weights folded into their A rows.
    """
    gen = torch.Generator().manual_seed(seed)
    total = sum(ranks)
    rank = pair.a.shape[0]
    assert total >= rank
    q, _ = torch.linalg.qr(torch.randn(total, total, dtype=torch.float64, generator=gen))
    m = q[:rank]  # (R, R') with orthonormal rows: M M^T = I
    scales = torch.rand(total, dtype=torch.float64, generator=gen) + 0.5
    b2 = (pair.b @ m) * scales[None, :]  # each new client's B, rescaled
    a2 = (m.T @ pair.a) / scales[:, None]  # and its A with weight/scaling folded in
    return LoraPair(a2, b2)


@settings(max_examples=40, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    d_out=st.integers(1, 24),
    d_in=st.integers(1, 24),
    seed=st.integers(0, 10_000),
)
def test_canonical_factors_reproduce_the_stacked_update(ranks, d_out, d_in, seed):
    pair = stacked(ranks, d_out, d_in, seed)
    canon = canonical_pair(pair, out_dtype=torch.float64)
    assert canon.a.shape[0] == canon.b.shape[1] <= min(sum(ranks), d_out, d_in)
    assert relative(canon.b @ canon.a, pair.b @ pair.a) < 1e-10
    s = singular_values(canon)
    assert torch.all(s[:-1] >= s[1:])


def test_float32_result_is_exact_to_float32_round_off():
    pair = stacked([4, 8, 16], 40, 30, seed=3)
    canon = canonical_pair(pair)
    assert canon.a.dtype == canon.b.dtype == torch.float32
    assert relative(canon.b.double() @ canon.a.double(), pair.b @ pair.a) < 1e-6


def test_matches_the_dense_svd_oracle():
    pair = stacked([3, 5, 2], 17, 13, seed=11)
    canon = canonical_pair(pair, out_dtype=torch.float64)
    u, s, vh = torch.linalg.svd(pair.b @ pair.a)
    rho = canon.a.shape[0]
    assert rho == 10
    torch.testing.assert_close(singular_values(canon), s[:rho], rtol=1e-10, atol=0)
    # The same singular vectors up to sign (the oracle has no sign convention) ...
    signs = torch.sign((canon.b * u[:, :rho]).sum(0))
    torch.testing.assert_close(canon.b, u[:, :rho] * s[:rho].sqrt() * signs, rtol=0, atol=1e-10)
    torch.testing.assert_close(canon.a, vh[:rho] * (s[:rho].sqrt() * signs)[:, None], rtol=0, atol=1e-10)
    # ... with ours fixed: each column's largest-magnitude entry is positive.
    pivots = canon.b.abs().argmax(0)
    assert torch.all(canon.b[pivots, torch.arange(rho)] > 0)


@pytest.mark.parametrize("ranks_2", [[6, 1, 3], [2, 2, 2, 2, 2, 4], [15]])
def test_different_clients_with_the_same_sum_get_the_same_factors(ranks_2):
    pair = stacked([4, 2, 3], 20, 16, seed=5)
    other = same_sum_other_clients(pair, ranks_2, seed=9)
    assert other.a.shape != pair.a.shape or not torch.allclose(other.a, pair.a)
    relative_sum = relative(other.b @ other.a, pair.b @ pair.a)
    assert relative_sum < 1e-12
    first, second = canonical_pair(pair), canonical_pair(other)
    assert first.a.shape == second.a.shape == (9, 16)
    assert relative(second.a, first.a) < 1e-5 and relative(second.b, first.b) < 1e-5


def test_no_slice_of_the_canonical_factors_is_a_clients_factors():
    adapters, weights = client_updates([3, 5, 2], 20, 16, seed=2)
    canon = canonical_pair(flora_stack(adapters, weights, torch.float64).pairs["m"])
    for adapter, p in zip(adapters, weights):
        a_k, b_k = adapter.pairs["m"]
        r = adapter.rank
        for start in range(canon.a.shape[0] - r + 1):
            rows, cols = canon.a[start : start + r].double(), canon.b[:, start : start + r].double()
            for a_sent in (a_k, a_k * p * adapter.scaling):
                assert not torch.allclose(rows, a_sent.double(), rtol=1e-3, atol=1e-6)
            assert not torch.allclose(cols, b_k.double(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_leading_rows_are_the_best_rank_k_approximation(k):
    pair = stacked([4, 4, 2], 18, 15, seed=21)
    canon = canonical_pair(pair, out_dtype=torch.float64)
    dense = pair.b @ pair.a
    u, s, vh = torch.linalg.svd(dense)
    best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    truncated = canon.b[:, :k] @ canon.a[:k]
    assert relative(truncated, best) < 1e-10
    # Eckart-Young: the error is exactly the energy of the singular values left out.
    err = torch.linalg.matrix_norm(dense - truncated).item()
    assert err == pytest.approx(s[k:].square().sum().sqrt().item(), rel=1e-9)


def test_rank_is_capped_by_the_smaller_side_and_round_off_is_cut():
    wide = stacked([20, 20], 6, 50, seed=1)  # R = 40 > d_out = 6
    assert canonical_pair(wide).a.shape == (6, 50)
    tall = stacked([20, 20], 50, 7, seed=1)
    assert canonical_pair(tall).b.shape == (50, 7)
    # A rank-2 sum reached through rank 12: ten singular values are round-off and go.
    low = stacked([2], 30, 30, seed=4)
    padded = same_sum_other_clients(low, [5, 7], seed=4)
    assert canonical_pair(padded).a.shape == (2, 30)


def test_zero_update_keeps_a_rank_one_zero_form():
    canon = canonical_pair(LoraPair(torch.zeros(5, 9), torch.zeros(4, 5)))
    assert canon.a.shape == (1, 9) and canon.b.shape == (4, 1)
    assert not canon.a.any() and not canon.b.any()


def test_no_dense_product_is_formed_for_a_thin_stack():
    # A 20000 x 20000 dense delta would need 3.2 GB in float64; the thin path needs a few MB.
    gen = torch.Generator().manual_seed(0)
    pair = LoraPair(torch.randn(8, 20_000, generator=gen), torch.randn(20_000, 8, generator=gen))
    canon = canonical_pair(pair)
    assert canon.a.shape == (8, 20_000)
    probe = torch.randn(20_000, 1, generator=gen, dtype=torch.float64)
    expect = pair.b.double() @ (pair.a.double() @ probe)
    assert relative(canon.b.double() @ (canon.a.double() @ probe), expect) < 1e-5


def test_rejects_factors_of_mismatched_rank():
    with pytest.raises(ValueError, match="not \\(R, d_in\\) and \\(d_out, R\\)"):
        canonical_pair(LoraPair(torch.zeros(3, 4), torch.zeros(5, 2)))


def cancelling_stack(d: int, rank: int, gap: float, seed: int) -> LoraPair:
    """flora-warm's change: trained factors next to the nearly equal ones the client started from.

    B = [B0 + gap E, B0], A = [A0; -A0 + gap F]: B A = gap (E A0 + B0 F) + gap^2 E F, so |B A| is
    about ``gap`` times |B| |A|, and B has condition number about 1 / gap.
    """
    gen = torch.Generator().manual_seed(seed)
    b0, e = (torch.randn(d, rank, generator=gen, dtype=torch.float64) for _ in range(2))
    a0, f = (torch.randn(rank, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return LoraPair(torch.cat([a0, -a0 + gap * f]), torch.cat([b0 + gap * e, b0], dim=1))


def test_cholesky_and_householder_paths_agree_on_a_stack_of_independent_clients():
    pair = stacked([8, 4, 4, 2, 1], 120, 90, seed=7)
    fast = canonical._cholesky_svd(pair.a, pair.b)
    assert fast is not None  # independent clients: well conditioned, the Gram path is taken
    slow = canonical.householder_svd(pair.a, pair.b)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-12, atol=0)
    # Same singular vectors up to sign, orthonormal in both.
    signs = torch.sign((fast[0] * slow[0]).sum(0))
    torch.testing.assert_close(fast[0] * signs, slow[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(fast[2] * signs[:, None], slow[2], rtol=0, atol=1e-10)


def wide_spectrum_stack(d: int, rank: int, seed: int) -> LoraPair:
    """Well-conditioned factors (cond 400 each, inside the Cholesky screen) whose product's
    singular values span 1.6e5: B = Q_1 diag(sigma), A = diag(sigma) Q_2^T, sigma from 1 to 1/400."""
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, -2.6, rank, dtype=torch.float64)
    return LoraPair(sigma[:, None] * q2.T, q1 * sigma[None, :])


def test_independent_clients_take_the_eigensolver_on_the_core(monkeypatch):
    pair = stacked([8, 4, 4, 2, 1], 120, 90, seed=7)
    monkeypatch.setattr(canonical, "_core_svd", lambda *args: pytest.fail("the core's SVD was taken"))
    fast = canonical._cholesky_svd(pair.a, pair.b)
    assert fast is not None
    torch.testing.assert_close(fast[1], torch.linalg.svdvals(pair.b @ pair.a)[:19], rtol=1e-12, atol=0)


def test_a_wide_core_spectrum_takes_the_cores_svd_and_agrees_with_householder():
    pair = wide_spectrum_stack(150, 12, seed=2)
    r_b, r_a = canonical._gram_root(pair.b), canonical._gram_root(pair.a.T)
    assert r_b is not None and r_a is not None  # passes the Cholesky screen
    assert canonical._core_eigh(pair.a, pair.b, r_b @ r_a.T, r_a) is None  # lambda ratio 4e-11
    fast = canonical._cholesky_svd(pair.a, pair.b)
    assert fast is not None
    slow = canonical.householder_svd(pair.a, pair.b)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-10, atol=0)
    signs = torch.sign((fast[0] * slow[0]).sum(0))
    torch.testing.assert_close(fast[0] * signs, slow[0], rtol=0, atol=1e-9)


def test_a_cancelling_stack_takes_householder_and_stays_exact_relative_to_its_product():
    pair = cancelling_stack(200, 6, gap=1e-6, seed=3)
    assert canonical._cholesky_svd(pair.a, pair.b) is None  # cond(B) ~ 1e6: its Gram would lose it
    canon = canonical_pair(pair, out_dtype=torch.float64)
    dense = pair.b @ pair.a
    assert relative(canon.b @ canon.a, dense) < 1e-8  # error relative to |B A|, not to |B| |A|
    torch.testing.assert_close(singular_values(canon), torch.linalg.svdvals(dense)[: canon.a.shape[0]], rtol=1e-7, atol=0)


def test_the_orthogonality_check_catches_what_the_diagonal_screen_lets_through(monkeypatch):
    pair = cancelling_stack(200, 6, gap=1e-6, seed=3)
    monkeypatch.setattr(canonical, "CHOLESKY_MAX_DIAGONAL_RATIO", float("inf"))
    assert canonical._cholesky_svd(pair.a, pair.b) is None  # Q off orthonormal by ~eps cond^2
    monkeypatch.setattr(canonical, "CHOLESKY_MAX_ORTHOGONALITY_ERROR", float("inf"))
    assert canonical._cholesky_svd(pair.a, pair.b) is not None  # the check, not the screen, refused it


@pytest.mark.parametrize("shape", [(300, 200, 12), (6, 50, 40)])  # thin: from the core; wide: the dense product
def test_product_norm_is_the_frobenius_norm_of_the_product(shape):
    d_out, d_in, rank = shape
    gen = torch.Generator().manual_seed(1)
    pair = LoraPair(torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen))
    expect = torch.linalg.matrix_norm(pair.b.double() @ pair.a.double()).item()
    assert canonical.product_norm(pair) == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("gap", [1e-7, 1e-8])
def test_product_norm_of_a_cancelling_stack_is_accurate_where_gram_matrices_lose_it(gap):
    """|B A| ~ gap |B| |A|. The Gram shortcut sqrt(trace(B^T B A A^T)) squares that: its rounding,
    ~eps |B|^2 |A|^2, is gap^-2 eps of the answer (1e-3 to 1e-2 at gap 1e-7, all of it at 1e-8),
    so a product_norm that took it would miss the bound below by orders of magnitude. The bound
    is on flora's result alone: how wrong the shortcut happens to be varies with the CPU's BLAS."""
    pair = cancelling_stack(200, 6, gap=gap, seed=5)
    expect = torch.linalg.matrix_norm(pair.b @ pair.a).item()  # dense float64: error ~ eps / gap
    assert canonical.product_norm(pair) == pytest.approx(expect, rel=1e-6)
