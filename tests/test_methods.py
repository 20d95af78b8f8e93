"""Aggregation methods behind one interface, checked against dense oracles.

The oracle of a round: client k's trained model is M - removed_k + s_k B_k A_k (dense, formed
here by explicit products), and the exact FedAvg is sum_k p_k of those. Exact methods must merge
exactly that; the baselines must reproduce the averaging they are defined by.
"""

from __future__ import annotations

import math

import pytest
import torch

from flora.common.aggregation import fedit_average, zeropad_average
from flora.common.lora import LoraAdapter, LoraPair, pad_rank
from flora.common.methods import METHODS, get_method, round_error
from flora.common.methods.base import clipped_factors, clipped_stack, principal, toward
from flora.common.robust import RobustPolicy, robust_inputs

SHAPES = {"layer.0.q": (12, 10), "layer.0.v": (6, 10)}
MIXED = (5, 3, 1)
WEIGHTS = [0.5, 0.3, 0.2]
SCALING = 2.0
EXACT = [name for name, m in METHODS.items() if m.exact]


def dense(adapter: LoraAdapter | None, name: str) -> torch.Tensor:
    d_out, d_in = SHAPES[name]
    if adapter is None:
        return torch.zeros(d_out, d_in, dtype=torch.float64)
    a, b = adapter.pairs[name]
    return adapter.scaling * (b.double() @ a.double())


def trained(start, rank: int, seed: int) -> LoraAdapter:
    """A stand-in for local training: the start moved by a random step (A kept when frozen)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, (d_out, d_in) in SHAPES.items():
        a = torch.randn(rank, d_in, generator=g) if start.init is None else start.init.pairs[name].a.clone()
        b = torch.zeros(d_out, rank) if start.init is None else start.init.pairs[name].b.clone()
        if start.train_a:
            a = a + 0.3 * torch.randn(rank, d_in, generator=g)
        pairs[name] = LoraPair(a, b + 0.3 * torch.randn(d_out, rank, generator=g))
    return LoraAdapter(pairs, SCALING)


def play(name: str, ranks=MIXED, rounds: int = 3, weights=WEIGHTS):
    """Run ``rounds`` rounds on a dense global model; yield (model before, starts, updates, result)."""
    method = get_method(name)
    method.validate(list(ranks), [SCALING] * len(ranks))
    model = {n: torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) for n, shape in SHAPES.items()}
    kept = method.initial(SHAPES, max(ranks), SCALING, seed=11)
    if kept is not None:
        model = {n: model[n] + dense(kept, n) for n in model}  # M = W + global LoRA
    for t in range(rounds):
        starts = [method.start(kept, r, SCALING) for r in ranks]
        updates = [trained(s, r, seed=100 * t + k) for k, (s, r) in enumerate(zip(starts, ranks))]
        result = method.merge(kept, updates, weights)
        yield model, kept, starts, updates, result
        model = {n: model[n] + dense(result.delta, n) for n in model}
        kept = result.kept


@pytest.mark.parametrize("name", EXACT)
def test_exact_methods_merge_the_fedavg_of_the_clients_models_over_rounds(name) -> None:
    for model, _, starts, updates, result in play(name):
        for n in SHAPES:
            clients = [model[n] - dense(s.removed, n) + dense(u, n) for s, u in zip(starts, updates)]
            fedavg = sum(p * c for p, c in zip(WEIGHTS, clients))
            merged = model[n] + dense(result.delta, n)
            assert torch.allclose(merged, fedavg, rtol=0, atol=1e-5 * fedavg.abs().max()), n
        assert round_error(result.delta, updates, WEIGHTS, [s.removed for s in starts]) < 1e-6


@pytest.mark.parametrize("name", ["fedit", "flora-warm", "fedex"])
def test_round_error_from_factors_equals_the_dense_definition(name) -> None:
    ranks = (3, 3, 3) if name == "fedit" else MIXED
    for model, _, starts, updates, result in play(name, ranks=ranks):
        diff_sq = ideal_sq = 0.0
        for n in SHAPES:
            ideal = sum(p * (dense(u, n) - dense(s.removed, n)) for p, s, u in zip(WEIGHTS, starts, updates))
            diff_sq += torch.linalg.matrix_norm(dense(result.delta, n) - ideal).item() ** 2
            ideal_sq += torch.linalg.matrix_norm(ideal).item() ** 2
        expect = math.sqrt(diff_sq / ideal_sq)
        got = round_error(result.delta, updates, WEIGHTS, [s.removed for s in starts])
        assert got == pytest.approx(expect, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("name", EXACT)
def test_exact_methods_start_every_client_on_the_global_model(name) -> None:
    for _, _, starts, _, _ in play(name, rounds=2):
        for s in starts:
            for n in SHAPES:
                assert torch.allclose(dense(s.init, n), dense(s.removed, n), atol=1e-6)


def test_flora_warm_starts_from_the_best_rank_r_approximation_of_the_aggregate() -> None:
    rounds = list(play("flora-warm", rounds=2))
    _, _, _, first_updates, _ = rounds[0]
    _, kept, starts, _, _ = rounds[1]
    assert kept.rank == max(MIXED) and kept.scaling == 1.0  # canonical factors, cut to the largest client rank
    for s, rank in zip(starts, MIXED):
        assert s.init.rank == rank and s.init.scaling == SCALING
        for n in SHAPES:
            target = sum(p * dense(u, n) for p, u in zip(WEIGHTS, first_updates))  # round 1's aggregate
            sv = torch.linalg.svdvals(target)
            error = torch.linalg.matrix_norm(target - dense(s.init, n)).item()
            assert math.isclose(error, sv[rank:].square().sum().sqrt().item(), rel_tol=1e-4, abs_tol=1e-6)  # Eckart-Young
            a, b = s.init.pairs[n]
            assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-4)  # balanced: sqrt(S / s) on each side


def test_a_start_is_computed_once_per_kept_lora_rank_and_scaling(monkeypatch) -> None:
    """The server asks for a client's start at upload and the merge asks again: one SVD, not two."""
    method = get_method("flora-warm")
    *_, (_, played, _, updates, _) = play("flora-warm", rounds=2)
    kept = LoraAdapter(dict(played.pairs), played.scaling)  # the same LoRA as a new object: nothing memoised
    calls = []
    real = type(method).start
    monkeypatch.setattr(type(method), "start", lambda self, *args: calls.append(args[1:]) or real(self, *args))
    uploads = [method.cached_start(kept, u.rank, u.scaling) for u in updates]  # as each upload arrived
    result = method.merge(kept, updates, WEIGHTS)
    assert sorted(calls) == sorted({(u.rank, u.scaling) for u in updates})  # once per rank, at the uploads
    assert [method.cached_start(kept, u.rank, u.scaling) for u in updates] == uploads
    method.cached_start(result.kept, updates[0].rank, updates[0].scaling)  # a new kept LoRA: computed afresh
    assert len(calls) == len(set(MIXED)) + 1


@pytest.mark.parametrize("name", ["flora-warm", "fedex"])
def test_clients_with_the_same_start_share_one_removed_term_in_the_stack(name) -> None:
    ranks, weights = (3, 3, 3, 1), [0.4, 0.3, 0.2, 0.1]  # two distinct starts: rank 3 (three clients) and rank 1
    *_, (model, kept, starts, updates, result) = play(name, ranks=ranks, rounds=2, weights=weights)
    assert result.delta.rank == sum(u.rank for u in updates) + 3 + 1  # R + one term per distinct start
    for n in SHAPES:
        expect = sum(p * (dense(u, n) - dense(s.removed, n)) for p, s, u in zip(weights, starts, updates))
        assert torch.allclose(dense(result.delta, n), expect, rtol=0, atol=1e-6 * expect.abs().max()), n


def test_flora_warm_first_round_is_fresh_and_then_plain_stacking() -> None:
    (_, kept, starts, updates, result), *_ = play("flora-warm", rounds=1)
    assert kept is None and all(s.init is None and s.removed is None for s in starts)
    flora = get_method("flora").merge(None, updates, WEIGHTS)
    assert all(torch.equal(result.delta.pairs[n].a, flora.delta.pairs[n].a) for n in SHAPES)


@pytest.mark.parametrize("name", ["fedit", "zeropad"])
def test_baselines_replace_the_global_lora_by_the_average_of_the_factors(name) -> None:
    ranks = (3, 3, 3) if name == "fedit" else MIXED
    average = fedit_average if name == "fedit" else zeropad_average
    for model, kept, starts, updates, result in play(name, ranks=ranks):
        expected = pad_rank(average(updates, WEIGHTS), max(ranks))
        for n in SHAPES:
            assert torch.equal(result.kept.pairs[n].a, expected.pairs[n].a)
            assert torch.allclose(model[n] + dense(result.delta, n), model[n] - dense(kept, n) + dense(expected, n), atol=1e-5)
        for s, r in zip(starts, ranks):  # on the base W = M - global LoRA, from its leading part
            assert s.init.rank == r and torch.equal(s.init.pairs["layer.0.q"].b, kept.pairs["layer.0.q"].b[:, :r])
            assert s.removed is kept


@pytest.mark.parametrize("name", ["fedit", "zeropad"])
def test_averaging_baselines_merge_with_cross_terms(name) -> None:
    ranks = (3, 3, 3) if name == "fedit" else MIXED
    errors = [round_error(r.delta, u, WEIGHTS, [s.removed for s in st]) for _, _, st, u, r in play(name, ranks=ranks)]
    assert errors[-1] > 1e-3


def test_fedex_with_equal_ranks_folds_the_paper_residual_into_the_base() -> None:
    ranks = (3, 3, 3)
    for model, kept, _, updates, result in play("fedex", ranks=ranks):
        avg = fedit_average(updates, WEIGHTS)
        for n in SHAPES:
            assert torch.equal(result.kept.pairs[n].a, avg.pairs[n].a) and torch.equal(result.kept.pairs[n].b, avg.pairs[n].b)
            residual = sum(p * dense(u, n) for p, u in zip(WEIGHTS, updates)) - dense(avg, n)
            base_before, base_after = model[n] - dense(kept, n), model[n] + dense(result.delta, n) - dense(avg, n)
            assert torch.allclose(base_after - base_before, residual, atol=1e-5)


def test_ffa_keeps_the_shared_a_and_never_reads_a_clients_a() -> None:
    rounds = list(play("ffa"))
    first_a = rounds[0][1].pairs["layer.0.q"].a
    for _, kept, starts, updates, result in rounds:
        assert torch.equal(result.kept.pairs["layer.0.q"].a, first_a)
        assert all(not s.train_a for s in starts)
        forged = [LoraAdapter({n: LoraPair(torch.randn_like(p.a), p.b) for n, p in u.pairs.items()}, u.scaling) for u in updates]
        again = get_method("ffa").merge(kept, forged, WEIGHTS)
        assert all(torch.equal(again.delta.pairs[n].a, result.delta.pairs[n].a) for n in SHAPES)
        for n in SHAPES:
            b = sum(p * pad_rank(u, max(MIXED)).pairs[n].b for p, u in zip(WEIGHTS, updates))
            assert torch.allclose(result.kept.pairs[n].b, b, atol=1e-6)


def test_flexlora_merges_exactly_but_starts_low_rank_clients_off_the_global_model() -> None:
    for model, kept, starts, updates, result in play("flexlora", rounds=2):
        assert round_error(result.delta, updates, WEIGHTS, [s.removed for s in starts]) < 1e-6
    gap = [torch.linalg.matrix_norm(dense(s.removed, "layer.0.q") - dense(s.init, "layer.0.q")).item() for s in starts]
    assert min(gap) > 1e-3  # the truncation: a client's model at step 0 is not the global model


def test_flexlora_clients_start_from_the_truncated_average_of_products_on_the_base() -> None:
    rounds = list(play("flexlora", rounds=2))
    _, kept, starts, _, _ = rounds[1]
    for s, r in zip(starts, MIXED):
        assert s.removed is kept
        for n in SHAPES:
            assert torch.allclose(dense(s.init, n), dense(principal(kept, r, SCALING), n))


@pytest.mark.parametrize("name", ["flora-warm", "flexlora"])
def test_stacking_methods_keep_canonical_factors_of_the_aggregate_not_the_stack(name) -> None:
    """What is kept is served to every client: it must depend on the sum alone, never on who sent what."""
    method = get_method(name)
    one, two = (trained(method.start(None, r, SCALING), r, seed) for r, seed in ((3, 1), (2, 2)))
    split = LoraAdapter({n: LoraPair(p.a * 0.5, p.b) for n, p in one.pairs.items()}, SCALING)  # half of `one`...
    kept = method.merge(None, [one, two], [0.5, 0.5]).kept
    again = method.merge(None, [split, split, two], [0.5, 0.5, 0.5]).kept  # ... twice: the same sum, other clients
    for n in SHAPES:
        assert torch.allclose(kept.pairs[n].a, again.pairs[n].a, atol=1e-5)
        assert torch.allclose(kept.pairs[n].b, again.pairs[n].b, atol=1e-5)
        stacked_a = torch.cat([0.5 * SCALING * one.pairs[n].a, 0.5 * SCALING * two.pairs[n].a])
        assert kept.pairs[n].a.shape[0] < stacked_a.shape[0] or not torch.allclose(kept.pairs[n].a, stacked_a)


def test_principal_starts_directions_beyond_the_update_rank_as_a_fresh_lora() -> None:
    """A random, B zero (PEFT's init), seeded by module and rank: the product is the update's, and
    the extra directions train (both factors zero would have zero gradients for ever)."""
    one = LoraAdapter({"m": LoraPair(torch.randn(1, 40), torch.randn(3, 1))}, 1.0)
    init = principal(one, 3, 2.0)
    a, b = init.pairs["m"]
    assert init.rank == 3 and torch.allclose(2.0 * b @ a, one.delta("m"), atol=1e-5)
    assert torch.count_nonzero(b[:, 1:]) == 0
    assert (a[1:].abs() > 0).all() and a[1:].abs().max() <= 1 / math.sqrt(40)  # PEFT's bound, 1/sqrt(d_in)
    again = principal(LoraAdapter({"m": LoraPair(one.pairs["m"].a.clone(), one.pairs["m"].b.clone())}, 1.0), 3, 2.0)
    assert torch.equal(again.pairs["m"].a, a) and torch.equal(again.pairs["m"].b, b)  # server and client agree


def test_a_flora_warm_client_above_the_kept_rank_trains_every_direction() -> None:
    """Client sampling: round 1's largest rank is 1, so a rank-3 client's start has two directions
    beyond the kept aggregate. One training step must move B in all three of them."""
    method = get_method("flora-warm")
    kept = method.merge(None, [trained(method.start(None, 1, SCALING), 1, seed=1)], [1.0]).kept
    start = method.start(kept, 3, SCALING)
    for name, (d_out, d_in) in SHAPES.items():
        a0, b0 = (t.clone().requires_grad_() for t in start.init.pairs[name])
        x = torch.randn(8, d_in, generator=torch.Generator().manual_seed(2))
        loss = (SCALING * x @ a0.T @ b0.T - torch.ones(8, d_out)).square().sum()
        loss.backward()
        assert (b0.grad.abs().sum(0) > 0).all(), name  # every column of B has a gradient


@pytest.mark.parametrize(
    ("name", "ranks", "scalings", "message"),
    [
        ("fedit", [4, 2], [2.0, 2.0], "same rank"),
        ("zeropad", [4, 2], [2.0, 1.0], "one LoRA scaling"),
        ("fedex", [4, 4], [2.0, 1.0], "one LoRA scaling"),
        ("ffa", [4, 2], [0.5, 1.0], "one LoRA scaling"),
        ("flora", [4], [1.0, 2.0], "one scaling per client"),
    ],
)
def test_validate_refuses_runs_a_method_cannot_aggregate(name, ranks, scalings, message) -> None:
    with pytest.raises(ValueError, match=message):
        get_method(name).validate(ranks, scalings)


def test_mixed_ranks_and_scalings_pass_for_stacking_methods() -> None:
    for name in ("flora", "flora-warm", "flexlora"):
        get_method(name).validate([16, 1], [1.0, 3.0])


def test_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown aggregation method 'fedavg'; known: flora, flora-warm"):
        get_method("fedavg")


# --- clipping the change, not the trained LoRA ---------------------------------------------------

CLIP_POLICY = RobustPolicy(max_weight_share=None, clip_median_multiple=2.0)


def clipped_round(name: str, ranks=MIXED):
    """Round 2 of ``play`` (a non-trivial global LoRA) with client 0's change from its start made
    about 10x the others'; the robust rules' clip factors and the method's merge with them."""
    method = get_method(name)
    _, kept, starts, updates, _ = list(play(name, ranks, rounds=2))[1]
    updates = [toward(starts[0].init, updates[0], 10.0)] + updates[1:]
    inits = method.inits(kept, updates)
    adapters, weights, clips, decisions = robust_inputs(updates, inits, WEIGHTS, CLIP_POLICY)
    return method, kept, starts, updates, clips, decisions, method.merge(kept, adapters, weights, clips=clips)


@pytest.mark.parametrize("name", ["flora-warm", "fedex", "ffa", "flexlora"])
def test_clipping_bounds_a_warm_clients_change_exactly(name) -> None:
    method, kept, starts, updates, clips, decisions, result = clipped_round(name)
    norms = [d.norm for d in decisions]
    for u, s, norm in zip(updates, starts, norms):  # the norm is the change's, not the trained LoRA's
        change = math.sqrt(sum(float((dense(u, n) - dense(s.init, n)).square().sum()) for n in SHAPES))
        assert norm == pytest.approx(change, rel=1e-6)
    bound = 2.0 * sorted(norms)[1]
    assert clips[0] == pytest.approx(bound / norms[0]) and clips[0] < 0.2 and clips[1:] == [1.0, 1.0]
    # The liar's part of the merged delta: what it adds over the same round with the liar at its start.
    idle = method.merge(kept, [starts[0].init] + updates[1:], WEIGHTS).delta
    part = {n: dense(result.delta, n) - dense(idle, n) for n in SHAPES}
    assert math.sqrt(sum(float(p.square().sum()) for p in part.values())) == pytest.approx(WEIGHTS[0] * bound, rel=1e-5)
    for n in SHAPES:  # exactly c_0 times its change, nothing else of it
        want = WEIGHTS[0] * clips[0] * (dense(updates[0], n) - dense(starts[0].init, n))
        assert torch.allclose(part[n], want, rtol=0, atol=1e-5 * want.abs().max())
    if method.exact:  # and the rest of the round stays the exact FedAvg of the (clipped) models
        counted = [clipped_stack([u], [1.0], [s.init], clips=[c]) for u, s, c in zip(updates, starts, clips)]
        assert round_error(result.delta, counted, WEIGHTS, [s.removed for s in starts]) < 1e-6


def test_ffa_clipping_moves_b_toward_its_start_and_keeps_the_shared_a() -> None:
    _, kept, starts, updates, clips, _, result = clipped_round("ffa")
    for n in SHAPES:
        assert torch.equal(result.kept.pairs[n].a, kept.pairs[n].a)
        b0 = starts[0].init.pairs[n].b
        liar_b = b0 + clips[0] * (updates[0].pairs[n].b - b0)
        want = sum(p * pad_rank(LoraAdapter({n: LoraPair(u.pairs[n].a, b)}, SCALING), kept.rank).pairs[n].b
                   for p, u, b in zip(WEIGHTS, updates, [liar_b] + [u.pairs[n].b for u in updates[1:]]))
        assert torch.allclose(result.kept.pairs[n].b, want, atol=1e-6)


@pytest.mark.parametrize("name, ranks", [("fedit", (3, 3, 3)), ("zeropad", MIXED)])
def test_clipping_an_averaging_method_moves_the_clients_factors_to_the_bound(name, ranks) -> None:
    method, kept, starts, updates, clips, decisions, result = clipped_round(name, ranks)
    bound = 2.0 * sorted(d.norm for d in decisions)[1]
    assert clips[0] == pytest.approx(bound / decisions[0].norm) and clips[0] < 0.2 and clips[1:] == [1.0, 1.0]
    # The averaged factors are the clipped client's moved toward its start, on the line between the two,
    moved = clipped_factors(updates, [s.init for s in starts], clips)
    for n in SHAPES:
        for side in (0, 1):  # A, then B: moved - start = t (trained - start), one t in (0, 1)
            origin = starts[0].init.pairs[n][side]
            went, full = moved[0].pairs[n][side] - origin, updates[0].pairs[n][side] - origin
            t = float((went * full).sum() / full.square().sum())
            assert 0 < t < 1 and torch.allclose(went, t * full, atol=1e-6)
        assert torch.allclose(dense(result.delta, n), dense(method.merge(kept, moved, WEIGHTS).delta, n), atol=1e-6)
    # ... just so far that its own product's change from the start has the bound's norm.
    liar = math.sqrt(sum(float((dense(moved[0], n) - dense(starts[0].init, n)).square().sum()) for n in SHAPES))
    assert liar == pytest.approx(bound, rel=1e-5)
