"""Client-level DP releases (issue 31): every client's part in every released sum is within C
times its weight, the noise has the announced standard deviation in each pass, the published
round is a function of the release alone, and methods that cannot be released are refused."""

from __future__ import annotations

import math

import pytest
import torch

from flora.common.lora import LoraAdapter, LoraPair, pad_pair
from flora.common.methods import get_method
from flora.common.methods.base import canonical_adapter, exact_change
from flora.common.omega import round_seed
from flora.common.privacy.release import (
    clip_factor, noise_std, release_passes, secret_generator, sketch_omegas,
)
from flora.common.robust import RobustPolicy
from flora.common.sketch import range_basis
from flora.common.privacy.private_round import Privacy, clip_inputs, private_round, publish, release

SHAPES = {"layer.0.q": (96, 80), "layer.0.v": (64, 112)}
RANKS = [8, 4, 2, 1, 1, 4]
CLIP = 0.5
SIGMA = 1.3
POLICY = RobustPolicy(max_weight_share=0.3)
RELEASED = ("flora", "flora-warm", "flexlora", "ffa")


def _factors(rank: int, scale: float, generator: torch.Generator) -> dict[str, LoraPair]:
    return {n: LoraPair(torch.randn(rank, d_in, generator=generator) * scale, torch.randn(d_out, rank, generator=generator) * scale)
            for n, (d_out, d_in) in SHAPES.items()}


def _kept(method: str, seed: int = 3) -> LoraAdapter | None:
    """A kept global LoRA as a later round has it (nonzero B), or None for flora."""
    generator = torch.Generator().manual_seed(seed)
    if method == "flora":
        return None
    if method == "ffa":
        return LoraAdapter(_factors(max(RANKS), 0.2, generator), 2.0)
    return canonical_adapter(LoraAdapter(_factors(6, 0.3, generator), 1.0))


def _updates(method_name: str, kept: LoraAdapter | None, seed: int, ranks: list[int] = RANKS) -> list[LoraAdapter]:
    """Trained LoRAs of mixed ranks: each client's start moved by a step of its own size, so that
    some changes are far above the clip norm and some below it."""
    method, generator = get_method(method_name), torch.Generator().manual_seed(seed)
    updates = []
    for k, rank in enumerate(ranks):
        step = [0.01, 0.3, 0.05, 1.0, 0.002, 0.1][k % 6]
        scaling = kept.scaling if method.one_scaling else 2.0 / rank
        start = method.cached_start(kept, rank, scaling)
        pairs = {}
        for name, (d_out, d_in) in SHAPES.items():
            a0 = torch.randn(rank, d_in, generator=generator) / math.sqrt(d_in) if start.init is None else start.init.pairs[name].a
            b0 = torch.zeros(d_out, rank) if start.init is None else start.init.pairs[name].b
            da = torch.zeros_like(a0) if not start.train_a or start.init is None else torch.randn(a0.shape, generator=generator) * step
            pairs[name] = LoraPair(a0 + da, b0 + torch.randn(b0.shape, generator=generator) * step)
        updates.append(LoraAdapter(pairs, scaling))
    return updates


def _norm(parts: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in parts.values()))


def _contributions(method, kept, clipped) -> list[dict[str, torch.Tensor]]:
    """Each client's term p_k c_k D_k of the released sum, dense, in the released quantity's space."""
    starts = method.starts(kept, clipped.updates)
    terms = []
    for u, s, p, c in zip(clipped.updates, starts, clipped.weights, clipped.clips):
        if method.trains_a:
            one = exact_change([u], [p], [s.init], torch.float64, [c])
            terms.append({n: one.pairs[n].b @ one.pairs[n].a for n in SHAPES})
        else:
            terms.append({n: pad_pair(LoraPair(u.pairs[n].a, p * c * (u.pairs[n].b.double() - s.init.pairs[n].b.double())),
                                      kept.rank).b for n in SHAPES})
    return terms


def _privacy(kind: str = "sketch", sigma: float = SIGMA) -> Privacy:
    return Privacy(noise_multiplier=sigma, clip_norm=CLIP, release=kind, seed=11)


@pytest.mark.parametrize("method_name", RELEASED)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_client_contributes_more_than_c_times_its_weight_to_any_released_sum(method_name, seed):
    method, kept = get_method(method_name), _kept(method_name)
    updates = _updates(method_name, kept, seed)
    claimed = [float(n) for n in (50, 10, 5, 40, 1, 20)]
    clipped = clip_inputs(method, kept, updates, claimed, POLICY, CLIP)
    assert max(clipped.weights) <= 0.3 + 1e-12
    assert min(clipped.clips) < 0.5 and max(clipped.clips) == 1.0  # some clipped hard, some not at all
    terms = _contributions(method, kept, clipped)
    generator = torch.Generator().manual_seed(seed)
    for term, p in zip(terms, clipped.weights):
        assert _norm(term) <= CLIP * p * (1 + 1e-9)
        if method.trains_a:  # the sketch's passes: D Omega and D^T Q for any orthonormal Omega, Q
            omegas = sketch_omegas(SHAPES, {n: 9 for n in SHAPES}, 11, seed)
            assert _norm({n: term[n] @ omegas[n] for n in SHAPES}) <= CLIP * p * (1 + 1e-9)
            qs = {n: range_basis(torch.randn(d_out, 9, generator=generator, dtype=torch.float64)) for n, (d_out, _) in SHAPES.items()}
            assert _norm({n: term[n].T @ qs[n] for n in SHAPES}) <= CLIP * p * (1 + 1e-9)
    # ... and those terms are exactly what the release adds up (noise switched off to compare).
    quiet = release(method, kept, clipped, _privacy("dense", sigma=0.0), seed, torch.Generator().manual_seed(0))
    for name in SHAPES:
        pair = quiet.change.pairs[name]
        released = pair.b.double() if not method.trains_a else pair.b.double() @ pair.a.double()
        torch.testing.assert_close(released, sum(t[name] for t in terms), rtol=1e-9, atol=1e-12)


def test_the_noise_has_the_announced_std_in_both_passes_of_the_sketch():
    method = get_method("flora")
    updates = _updates("flora", None, 5, ranks=[2, 1, 1])
    clipped = clip_inputs(method, None, updates, [1.0, 1.0, 1.0], POLICY, CLIP)
    std = noise_std(SIGMA, CLIP, clipped.weights)
    assert std == pytest.approx(SIGMA * CLIP / 3)
    released = release(method, None, clipped, _privacy(), 4, torch.Generator().manual_seed(1234))
    change = exact_change(clipped.updates, clipped.weights, [None] * 3, torch.float64, clipped.clips)
    omegas = sketch_omegas(SHAPES, {n: 8 for n in SHAPES}, 11, 4)  # rank bound 4 + 4 oversampling
    first = [released.sketch.y[n] - (change.pairs[n].b @ change.pairs[n].a) @ omegas[n] for n in SHAPES]
    second = [released.sketch.p[n] - (change.pairs[n].b @ change.pairs[n].a).T @ range_basis(released.sketch.y[n])
              for n in SHAPES]
    for noise in (torch.cat([t.flatten() for t in first]), torch.cat([t.flatten() for t in second])):
        assert noise.numel() > 1000
        # ~1,300+ entries: the estimate is within 4% of the truth; 0.8x or 1.25x sigma fails.
        assert 0.9 * std < float(noise.std()) < 1.1 * std
        assert abs(float(noise.mean())) < 0.1 * std


@pytest.mark.parametrize(("method_name", "kind"), [("flora-warm", "dense"), ("ffa", "sketch")])
def test_the_dense_and_b_releases_have_the_announced_std(method_name, kind):
    method, kept = get_method(method_name), _kept(method_name)
    clipped = clip_inputs(method, kept, _updates(method_name, kept, 7), [1.0] * len(RANKS), POLICY, CLIP)
    std = noise_std(SIGMA, CLIP, clipped.weights)
    clear = release(method, kept, clipped, _privacy(kind, sigma=0.0), 2, torch.Generator().manual_seed(0))
    noisy = release(method, kept, clipped, _privacy(kind), 2, torch.Generator().manual_seed(99))
    assert noisy.kind == ("b" if method_name == "ffa" else "dense")
    noise = torch.cat([(noisy.change.delta(n, torch.float64) - clear.change.delta(n, torch.float64)).flatten()
                       if method.trains_a else (noisy.change.pairs[n].b - clear.change.pairs[n].b).flatten() for n in SHAPES])
    assert 0.9 * std < float(noise.std()) < 1.1 * std


@pytest.mark.parametrize("method_name", RELEASED)
def test_the_published_round_is_a_function_of_the_release_alone(method_name):
    # Two rounds with the same public metadata (ranks, scalings, claims) and different updates:
    # given the same recorded release, everything published is identical.
    method, kept = get_method(method_name), _kept(method_name)
    results = []
    for seed in (20, 21):
        clipped = clip_inputs(method, kept, _updates(method_name, kept, seed), [3.0, 1.0, 2.0, 1.0, 1.0, 2.0], POLICY, CLIP)
        if seed == 20:
            recorded = release(method, kept, clipped, _privacy(), 1, torch.Generator().manual_seed(5))
        results.append(publish(method, kept, clipped.clients, clipped.weights, recorded))
    first, second = results
    for name in SHAPES:
        assert torch.equal(first.delta.delta(name), second.delta.delta(name))
        if first.kept is not None:
            assert torch.equal(first.kept.delta(name), second.kept.delta(name))
    assert (first.kept is None) == (method_name == "flora")


@pytest.mark.parametrize("method_name", ["flora-warm", "flexlora"])
def test_warm_started_methods_keep_the_release_plus_the_public_starts(method_name):
    # Without noise the private result is the clear merge: the kept LoRA is rebuilt from the
    # release and the starts (no client factor needed), and the delta is the clear one: the
    # clipped change (flora-warm), the clipped average of the products minus the kept LoRA (flexlora).
    method, kept = get_method(method_name), _kept(method_name)
    updates = _updates(method_name, kept, 8)
    clipped = clip_inputs(method, kept, updates, [1.0] * len(RANKS), POLICY, CLIP)
    quiet = release(method, kept, clipped, _privacy("dense", sigma=0.0), 1, torch.Generator().manual_seed(0))
    private = publish(method, kept, clipped.clients, clipped.weights, quiet)
    clear = method.merge(kept, clipped.updates, clipped.weights, torch.float64, clipped.clips)
    for name in SHAPES:
        torch.testing.assert_close(private.delta.delta(name, torch.float64), clear.delta.delta(name, torch.float64),
                                   rtol=0, atol=1e-9 if method_name == "flora-warm" else 1e-5)  # flexlora's: float32 canonical
        torch.testing.assert_close(private.kept.delta(name, torch.float64), clear.kept.delta(name, torch.float64),
                                   rtol=0, atol=1e-5)


def test_ffa_keeps_the_public_starts_plus_the_released_b_sum():
    method, kept = get_method("ffa"), _kept("ffa")
    clipped = clip_inputs(method, kept, _updates("ffa", kept, 9), [1.0] * len(RANKS), POLICY, CLIP)
    quiet = release(method, kept, clipped, _privacy(sigma=0.0), 1, torch.Generator().manual_seed(0))
    private = publish(method, kept, clipped.clients, clipped.weights, quiet)
    clear = method.merge(kept, clipped.updates, clipped.weights, torch.float64, clipped.clips)
    for name in SHAPES:
        torch.testing.assert_close(private.kept.pairs[name].b.double(), clear.kept.pairs[name].b.double(), rtol=0, atol=1e-6)
        torch.testing.assert_close(private.delta.delta(name, torch.float64), clear.delta.delta(name, torch.float64),
                                   rtol=0, atol=1e-6)
        assert torch.equal(private.kept.pairs[name].a, kept.pairs[name].a)  # A is never noised: it is public


def test_the_history_gets_no_per_client_norm_or_clip_factor():
    method = get_method("flora")
    clipped = clip_inputs(method, None, _updates("flora", None, 1), [1.0] * len(RANKS), POLICY, CLIP)
    assert all(math.isnan(d.norm) and math.isnan(d.clip_factor) for d in clipped.decisions)
    assert [d.weight for d in clipped.decisions] == clipped.weights


def test_the_noise_is_secret_not_derived_from_public_values():
    method = get_method("flora")
    updates = _updates("flora", None, 1)
    first, _, _ = private_round(method, None, updates, [1.0] * len(RANKS), POLICY, _privacy(), 3)
    second, _, _ = private_round(method, None, updates, [1.0] * len(RANKS), POLICY, _privacy(), 3)
    name = sorted(SHAPES)[0]
    assert not torch.equal(first.delta.delta(name), second.delta.delta(name))
    assert secret_generator().initial_seed() != secret_generator().initial_seed()
    assert round_seed(11, 3) == round_seed(11, 3) != round_seed(11, 4)


@pytest.mark.parametrize("method_name", ["fedit", "zeropad", "fedex"])
def test_methods_whose_merge_is_not_a_sum_of_clipped_changes_are_refused(method_name):
    method = get_method(method_name)
    assert method.dp_refusal
    with pytest.raises(ValueError, match=f"{method_name} cannot run under differential privacy"):
        method.released(None, [(4, 2.0)], [1.0], LoraAdapter(_factors(4, 0.1, torch.Generator().manual_seed(0)), 1.0))
    assert all(get_method(m).dp_refusal is None for m in RELEASED)


def test_median_based_rules_are_refused_under_dp():
    method = get_method("flora")
    for policy in (RobustPolicy(clip_median_multiple=2.0), RobustPolicy(reject_median_multiple=3.0)):
        with pytest.raises(ValueError, match="median"):
            clip_inputs(method, None, _updates("flora", None, 1), [1.0] * len(RANKS), policy, CLIP)


def test_clip_factor_noise_std_and_passes():
    assert clip_factor(0.4, 0.5) == 1.0 and clip_factor(2.0, 0.5) == 0.25
    with pytest.raises(ValueError, match="dp_clip_norm"):
        clip_factor(1.0, 0.0)
    assert noise_std(2.0, 0.5, [0.2, 0.5, 0.3]) == pytest.approx(0.5)
    assert (release_passes("sketch", True), release_passes("dense", True), release_passes("sketch", False)) == (2, 1, 1)


def test_flora_sim_refuses_a_private_run_of_a_method_that_cannot_be_released():
    from flora.sim.engine import SimConfig

    with pytest.raises(ValueError, match="fedex cannot run under differential privacy"):
        SimConfig("fedex", (4, 4), 1, privacy=_privacy())
    assert SimConfig("flora-warm", (4, 2), 1, privacy=_privacy()).privacy == _privacy()
