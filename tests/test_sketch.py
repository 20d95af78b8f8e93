"""The two-pass range finder: exact for mixed ranks at the announced column bound, never larger
than a change in norm, and wrong when the bound is too small (so the bound is what matters)."""

from __future__ import annotations

import pytest
import torch

from flora.common.lora import LoraPair
from flora.common.omega import sketch_basis
from flora.common.sketch import (
    assemble, broadcast_basis, prefers_dense, project_columns, project_rows, range_basis, rank_bound, sketch_columns,
    sketch_width,
)

D_OUT, D_IN = 48, 40


def _changes(ranks: list[int], seed: int = 0) -> list[LoraPair]:
    generator = torch.Generator().manual_seed(seed)
    return [LoraPair(a=torch.randn(r, D_IN, generator=generator, dtype=torch.float64),
                     b=torch.randn(D_OUT, r, generator=generator, dtype=torch.float64)) for r in ranks]


def _two_pass(changes: list, columns: int, seed: int = 7) -> torch.Tensor:
    omega = sketch_basis(D_IN, columns, seed, "m")
    q = range_basis(sum(project_columns(c, omega) for c in changes))
    p = sum(project_rows(c, q) for c in changes)
    pair = assemble(q, p)
    return pair.b @ pair.a


def _dense(change: LoraPair) -> torch.Tensor:
    return change.b @ change.a


@pytest.mark.parametrize("ranks", [[16, 8, 4, 2], [1], [3, 3, 3]])
def test_two_passes_at_the_rank_bound_give_the_exact_sum_of_mixed_rank_changes(ranks):
    changes = _changes(ranks)
    exact = sum(_dense(c) for c in changes)
    columns = sketch_columns(sum(ranks), D_OUT, D_IN)
    result = _two_pass(changes, columns)
    assert torch.linalg.norm(result - exact) <= 1e-10 * torch.linalg.norm(exact)


def test_the_broadcast_basis_is_float32_values_and_the_assembly_takes_its_rounding_out_exactly():
    """Q travels in float32: the rounded Q' is orthonormal only to float32's precision and its span
    is not Q's, yet Q (Q'^T Q)^-1 P^T with P = D^T Q' gives back D to float64 round-off."""
    q = range_basis(torch.randn(D_OUT, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    sent = broadcast_basis(q)
    assert sent.dtype == torch.float64 and torch.equal(sent, sent.to(torch.float32).to(torch.float64))
    gap = torch.linalg.matrix_norm(sent.T @ sent - torch.eye(12, dtype=torch.float64))
    assert 0 < gap < 1e-5  # orthonormal to float32's precision, not exactly
    change = q @ torch.randn(12, D_IN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # in Q's span
    pair = assemble(q, project_rows(change, sent), sent)
    assert torch.linalg.norm(pair.b @ pair.a - change) <= 1e-12 * torch.linalg.norm(change)


@pytest.mark.parametrize("ranks", [[16, 8, 4, 2], [3, 3, 3]])
def test_two_passes_with_the_float32_broadcast_q_give_the_exact_sum(ranks):
    changes = _changes(ranks)
    exact = sum(_dense(c) for c in changes)
    omega = sketch_basis(D_IN, sketch_columns(sum(ranks), D_OUT, D_IN), 7, "m")
    q = range_basis(sum(project_columns(c, omega) for c in changes))
    sent = broadcast_basis(q)
    pair = assemble(q, sum(project_rows(c, sent) for c in changes), sent)
    assert torch.linalg.norm(pair.b @ pair.a - exact) <= 1e-10 * torch.linalg.norm(exact)


def test_dense_and_factored_changes_give_the_same_projections():
    changes = _changes([5, 2])
    omega = sketch_basis(D_IN, 9, 1, "m")
    for change in changes:
        assert torch.allclose(project_columns(change, omega), project_columns(_dense(change), omega), rtol=1e-12, atol=1e-12)
        q = range_basis(project_columns(change, omega))
        assert torch.allclose(project_rows(change, q), project_rows(_dense(change), q), rtol=1e-12, atol=1e-12)


def test_too_few_columns_lose_part_of_the_sum():
    changes = _changes([16, 8])
    exact = sum(_dense(c) for c in changes)
    result = _two_pass(changes, 12)  # 12 < 24 = the sum's rank
    assert torch.linalg.norm(result - exact) > 0.01 * torch.linalg.norm(exact)


def test_no_projection_is_larger_than_its_change():
    """The sensitivity bound of the private release: |D Omega| <= |D| and |D^T Q| <= |D|."""
    for seed in range(5):
        change = _changes([6], seed)[0]
        omega = sketch_basis(D_IN, 10, seed, "m")
        q = range_basis(torch.randn(D_OUT, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
        norm = torch.linalg.norm(_dense(change))
        assert torch.linalg.norm(project_columns(change, omega)) <= norm * (1 + 1e-12)
        assert torch.linalg.norm(project_rows(change, q)) <= norm * (1 + 1e-12)


def test_the_basis_is_orthonormal_and_drawn_from_its_seed_and_module_alone():
    omega = sketch_basis(D_IN, 12, 3, "m")
    assert omega.shape == (D_IN, 12)
    assert torch.allclose(omega.T @ omega, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.equal(omega, sketch_basis(D_IN, 12, 3, "m"))
    assert not torch.allclose(omega, sketch_basis(D_IN, 12, 4, "m"))
    assert not torch.allclose(omega, sketch_basis(D_IN, 12, 3, "n"))


def test_columns_are_capped_by_the_matrix_and_the_dense_choice_follows_the_issue_rule():
    assert sketch_columns(30, D_OUT, D_IN) == 34
    assert sketch_columns(100, D_OUT, D_IN) == D_IN
    assert not prefers_dense(4096, 4096, 64)
    assert prefers_dense(64, 64, 17)  # 2*17*128 = 4352 > 4096
    assert not prefers_dense(64, 64, 16)  # 4096 is not more than 4096
    assert rank_bound([16, 8, 4], []) == 28 and rank_bound([4, 2], [4, 2]) == 10  # warm: + the largest start
    assert sketch_width(12, 64, 64) == 16 and sketch_width(13, 64, 64) == 0  # the one rule, m or dense
    assert sketch_width(100, D_OUT, D_IN) == 0  # m = min(d_out, d_in): dense, a sketch would gain nothing
    with pytest.raises(ValueError, match="rank_bound 0"):
        sketch_columns(0, D_OUT, D_IN)
    with pytest.raises(ValueError, match="columns 41"):
        sketch_basis(D_IN, 41, 0, "m")
