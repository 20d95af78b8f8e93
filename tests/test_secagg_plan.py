"""The secure-aggregation plans: three rounds computed from sums alone equal the plain methods'
``merge`` (mixed ranks 16/8/4/2, clipping on), dense and sketched modules chosen by size, the
refused methods say why, clients clip to the bound, and a sum outside the announced range is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flora.common.downlink import plan_downlink
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import RoundResult, get_method
from flora.common.secagg.contribution import ClientChange, client_change, client_contribution
from flora.common.secagg.finish import server_step
from flora.common.secagg.fixedpoint import decode, encode, wrapping_sum
from flora.common.secagg.inprocess import masked_stages, masked_sum
from flora.common.secagg.plan import check_secure, plan_round, round_weights, sketch_bases, vector_length
from flora.common.secagg.secure_round import secure_round

SHAPES = {"layers.0.q_proj": (256, 240), "layers.0.v_proj": (24, 256)}  # q: sketched; v: dense (small d_out)
RANKS = [16, 8, 4, 2]
CLAIMS = [400.0, 300.0, 200.0, 100.0]
CLIP = 4.0


def _noise(shape: tuple[int, int], round_number: int, client: int, which: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * round_number + 10 * client + which)
    return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)


def _trained(method, kept: LoraAdapter | None, rank: int, scaling: float, round_number: int, client: int) -> LoraAdapter:
    """What client ``client`` uploads after training from its start: the start moved by seeded noise
    (the same noise whichever chain's start it is, so both chains train alike)."""
    init = method.cached_start(kept, rank, scaling).init
    pairs = {}
    for name, (d_out, d_in) in SHAPES.items():
        scale = 0.05 * (client + 1)  # later clients move further: they get clipped
        d_a = _noise((rank, d_in), round_number, client, 0, 0.06 if init is None else scale)
        d_b = _noise((d_out, rank), round_number, client, 1, scale)
        if init is None:
            pairs[name] = LoraPair(d_a, d_b)
        else:
            a0, b0 = (t.double() for t in init.pairs[name])
            pairs[name] = LoraPair(a0 if not method.trains_a else a0 + d_a, b0 + d_b)
    return LoraAdapter(pairs, scaling)


def _cumulative(deltas: list[RoundResult]) -> dict[str, torch.Tensor]:
    return {n: sum(r.delta.delta(n, torch.float64) for r in deltas) for n in SHAPES}


@pytest.mark.parametrize(("name", "clip"), [("flora", 8.0), ("flora-warm", 8.0), ("ffa", 1.2), ("flexlora", 8.0)])
def test_three_secure_rounds_merge_what_plain_stacking_merges(name, clip):
    method = get_method(name)
    one_scaling = method.one_scaling
    scalings = [0.5] * 4 if one_scaling else [16.0 / r for r in RANKS]
    kept0 = method.initial(SHAPES, max(RANKS), scalings[0], seed=3)
    kept0 = None if kept0 is None else kept0.to(torch.float64)
    weights = round_weights(CLAIMS, 0.5)
    plain_kept, secure_kept, plain, secure, clipped = kept0, kept0, [], [], []
    for round_number in range(3):
        plain_updates = [_trained(method, plain_kept, r, s, round_number, k) for k, (r, s) in enumerate(zip(RANKS, scalings))]
        secure_updates = [_trained(method, secure_kept, r, s, round_number, k) for k, (r, s) in enumerate(zip(RANKS, scalings))]
        result, clips = secure_round(method, secure_kept, secure_updates, weights, clip, wrapping_sum, seed=round_number,
                                     dtype=torch.float64)
        reference = method.merge(plain_kept, plain_updates, weights, torch.float64, clips)
        plain.append(reference)
        secure.append(result)
        clipped += clips
        plain_kept, secure_kept = reference.kept, result.kept
    assert any(c < 1.0 for c in clipped) and any(c == 1.0 for c in clipped)
    base = {n: torch.randn(*shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) for n, shape in SHAPES.items()}
    expected, got = _cumulative(plain), _cumulative(secure)
    for name in SHAPES:  # the update is held to 1e-6 of itself: stricter than of the merged model base + update
        assert torch.linalg.norm(got[name] - expected[name]) <= 1e-6 * torch.linalg.norm(expected[name])
        merged, reference = base[name] + got[name], base[name] + expected[name]
        assert torch.linalg.norm(merged - reference) <= 1e-6 * torch.linalg.norm(reference)
        if plain_kept is not None:  # what the next round starts from: from the sums alone, yet the same
            kept, expected_kept = secure_kept.delta(name, torch.float64), plain_kept.delta(name, torch.float64)
            assert torch.linalg.norm(kept - expected_kept) <= 1e-6 * torch.linalg.norm(expected_kept)



@pytest.mark.parametrize("name", ["flora", "flora-warm"])
def test_the_secure_downlink_has_the_form_and_rank_of_the_plain_stacks(name):
    """The round's sum reaches the downlink as factors of rank <= the rank bound (30 here), so it
    travels as the plain round's does: a dense-passed 64 x 64 module as rank-30 factors (not the
    dense matrix), a sketched 256 x 240 one at rank 30 (not the sketch's 34: with a clip bound far
    above the changes, the oversampling's round-off stands above the downlink's rank cut), the
    small v module dense in both; the change equals plain's to 1e-6."""
    shapes = {"layers.0.q_proj": (64, 64), "layers.0.v_proj": (32, 64), "layers.0.k_proj": (256, 240)}
    method, scalings = get_method(name), [16.0 / r for r in RANKS]
    kept = method.initial(shapes, max(RANKS), scalings[0], seed=3)
    generator = torch.Generator().manual_seed(4)
    updates = [LoraAdapter({n: LoraPair(torch.randn(r, d_in, generator=generator) / 8,
                                        1e-4 * torch.randn(d_out, r, generator=generator))
                            for n, (d_out, d_in) in shapes.items()}, s) for r, s in zip(RANKS, scalings)]
    weights = round_weights(CLAIMS, None)
    result, clips = secure_round(method, kept, updates, weights, 1e3, wrapping_sum, seed=1)
    plan = plan_round(method, kept, shapes, RANKS, scalings, weights, 1e3, 1)
    assert [(m.name, m.dense) for m in plan.modules] == [
        ("layers.0.k_proj", False), ("layers.0.q_proj", True), ("layers.0.v_proj", True)]
    reference = method.merge(kept, updates, weights, torch.float32, clips)
    plain, secure = plan_downlink(reference.delta.pairs), plan_downlink(result.delta.pairs)
    assert {n: (m.form, m.rank) for n, m in secure.modules.items()} == {
        n: (m.form, m.rank) for n, m in plain.modules.items()} == {
        "layers.0.k_proj": ("factors", 30), "layers.0.q_proj": ("factors", 30), "layers.0.v_proj": ("dense", None)}
    for n in shapes:
        expected = reference.delta.delta(n, torch.float64)
        assert torch.linalg.norm(result.delta.delta(n, torch.float64) - expected) <= 1e-6 * torch.linalg.norm(expected)


def test_a_small_module_travels_dense_in_one_pass_and_a_large_one_in_two_sketched_passes():
    method = get_method("flora")
    plan = plan_round(method, None, SHAPES, RANKS, [1.0] * 4, [0.25] * 4, CLIP, seed=0)
    modules = {m.name: m for m in plan.modules}
    assert modules["layers.0.v_proj"].dense  # 2 m (24 + 256) > 24 * 256
    assert not modules["layers.0.q_proj"].dense and modules["layers.0.q_proj"].columns == sum(RANKS) + 4
    assert plan.passes == 2
    assert vector_length(plan, 1) == 256 * 34 + 24 * 256 and vector_length(plan, 2) == 240 * 34
    small = plan_round(method, None, {"layers.0.v_proj": (24, 256)}, RANKS, [1.0] * 4, [0.25] * 4, CLIP, seed=0)
    assert small.passes == 1


def test_warm_starts_add_the_largest_start_rank_to_the_sketch():
    method = get_method("flora-warm")
    kept = _trained(get_method("flora"), None, 16, 1.0, 0, 0)
    plan = plan_round(method, kept, SHAPES, RANKS, [1.0] * 4, [0.25] * 4, CLIP, seed=0)
    assert {m.name: m.columns for m in plan.modules}["layers.0.q_proj"] == sum(RANKS) + max(RANKS) + 4


@pytest.mark.parametrize("name", ["fedit", "zeropad", "fedex"])
def test_methods_that_average_factors_are_refused_at_start_up_with_why(name):
    with pytest.raises(ValueError, match=rf"secure_aggregation: method {name} cannot run .*clip bound limits the change "
                                         r"of their product, not the factors.*use one of flora, flora-warm, flexlora, ffa"):
        check_secure(get_method(name))
    with pytest.raises(ValueError, match="cannot run under secure aggregation"):
        plan_round(get_method(name), None, SHAPES, [4, 4], [1.0, 1.0], [0.5, 0.5], CLIP, seed=0)


@pytest.mark.parametrize("name", ["flora", "flora-warm", "ffa", "flexlora"])
def test_methods_with_a_plan_pass_the_start_up_check(name):
    check_secure(get_method(name))


def _dense_plan(weights: list[float]):
    """A plan whose only pass is the dense change: a contribution's vector is the change itself."""
    return plan_round(get_method("flora"), None, {"layers.0.v_proj": (24, 256)}, [8, 2], [1.0, 1.0], weights, CLIP, seed=0)


def test_clients_clip_their_weighted_change_to_the_bound_before_encoding():
    plan = _dense_plan([0.75, 0.25])
    big = LoraAdapter({"layers.0.v_proj": LoraPair(torch.randn(8, 256, dtype=torch.float64), torch.ones(24, 8, dtype=torch.float64))})
    small = LoraAdapter({"layers.0.v_proj": LoraPair(1e-3 * torch.ones(2, 256, dtype=torch.float64), torch.ones(24, 2, dtype=torch.float64))})
    for index, update, weight in [(0, big, 0.75), (1, small, 0.25)]:
        change = client_change(plan, index, update)
        vector = decode(np.concatenate(client_contribution(plan, 1, change, {})), plan.bits)
        exact = weight * update.delta("layers.0.v_proj", torch.float64).reshape(-1).numpy()
        if change.norm > CLIP:
            assert change.clip == pytest.approx(CLIP / change.norm, rel=1e-12)
            assert np.linalg.norm(vector) == pytest.approx(weight * CLIP, rel=1e-9)
        else:
            assert change.clip == 1.0 and np.allclose(vector, exact, rtol=0, atol=1e-12)
    assert client_change(plan, 0, big).clip < 1.0 and client_change(plan, 1, small).clip == 1.0


def test_a_contribution_above_its_bound_is_not_uploaded():
    plan = _dense_plan([0.5, 0.5])
    forged = ClientChange(0, {"layers.0.v_proj": LoraPair(torch.ones(1, 256, dtype=torch.float64),
                                                          torch.ones(24, 1, dtype=torch.float64))}, 1.0, 1.0)
    with pytest.raises(ValueError, match="above its bound .*not uploaded"):
        client_contribution(plan, 1, forged, {})


def test_a_sum_encoded_at_the_wrong_scale_is_refused_by_the_server():
    plan = _dense_plan([0.5, 0.5])
    big = LoraAdapter({"layers.0.v_proj": LoraPair(torch.randn(8, 256, dtype=torch.float64), torch.ones(24, 8, dtype=torch.float64))})
    honest = np.concatenate(client_contribution(plan, 1, client_change(plan, 0, big), {}))
    scaled = encode(4 * decode(honest, plan.bits), plan.bits)  # as if encoded at scale 2^(bits + 2)
    assert isinstance(server_step(plan, 1, wrapping_sum([honest, honest])), RoundResult)
    with pytest.raises(ValueError, match="exceeds the announced bound"):
        server_step(plan, 1, wrapping_sum([honest, scaled]))


def test_a_client_whose_update_differs_from_its_announcement_is_refused():
    plan = _dense_plan([0.5, 0.5])
    update = LoraAdapter({"layers.0.v_proj": LoraPair(torch.ones(4, 256), torch.ones(24, 4))})
    with pytest.raises(ValueError, match="client 0 announced rank 8 and scaling 1, its update has rank 4"):
        client_change(plan, 0, update)


def test_every_client_draws_the_same_omega_from_the_seed_alone():
    plan = plan_round(get_method("flora"), None, SHAPES, RANKS, [1.0] * 4, [0.25] * 4, CLIP, seed=5)
    first, second = sketch_bases(plan), sketch_bases(plan)
    assert list(first) == ["layers.0.q_proj"] and torch.equal(first["layers.0.q_proj"], second["layers.0.q_proj"])
    other = sketch_bases(plan_round(get_method("flora"), None, SHAPES, RANKS, [1.0] * 4, [0.25] * 4, CLIP, seed=6))
    assert not torch.allclose(first["layers.0.q_proj"], other["layers.0.q_proj"])


def test_round_weights_cap_the_claims_as_the_plain_path_does():
    weights = round_weights([900.0, 50.0, 50.0], 0.5)
    assert weights == pytest.approx([0.5, 0.25, 0.25]) and math.isclose(sum(weights), 1.0)


def test_a_round_through_the_masked_sum_equals_the_plain_sum_bit_for_bit():
    """The crypto layer's masks cancel exactly mod 2^64, so the server's result cannot tell them apart."""
    method = get_method("flora")
    updates = [_trained(method, None, r, 1.0, 0, k) for k, r in enumerate(RANKS)]

    def masked(vectors: list[np.ndarray]) -> np.ndarray:
        return masked_sum(dict(enumerate(vectors, start=1)), threshold=3, seed=7)

    plain, _ = secure_round(method, None, updates, [0.25] * 4, 8.0, wrapping_sum, dtype=torch.float64)
    secure, _ = secure_round(method, None, updates, [0.25] * 4, 8.0, masked, dtype=torch.float64)
    for name in SHAPES:
        assert torch.equal(secure.delta.pairs[name].a, plain.delta.pairs[name].a)
        assert torch.equal(secure.delta.pairs[name].b, plain.delta.pairs[name].b)


def test_both_passes_as_masked_stages_of_one_round_give_the_plain_result():
    """As the wire will run it: one key agreement, then pass 1 and pass 2 as the round's two masked
    stages, each client's pass-2 vectors computed from Q, which the server derives from stage 1's sums."""
    method, weights = get_method("flora-warm"), [0.25] * 4
    kept = _trained(get_method("flora"), None, 16, 1.0, 9, 0)
    updates = [_trained(method, kept, r, 1.0, 1, k) for k, r in enumerate(RANKS)]
    plan = plan_round(method, kept, SHAPES, RANKS, [1.0] * 4, weights, 8.0, seed=0)
    changes, bases, sketches = [client_change(plan, k, u) for k, u in enumerate(updates)], sketch_bases(plan), {}

    def vectors(stage: int, client: int, previous) -> list[np.ndarray]:
        if stage == 1:  # one vector per stage (j = 0): the pass's blocks concatenated
            return [np.concatenate(client_contribution(plan, 1, changes[client - 1], bases))]
        if "q" not in sketches:  # the server's broadcast, once
            sketches["q"] = server_step(plan, 1, previous.sums[0], dtype=torch.float64)
        return [np.concatenate(client_contribution(plan, 2, changes[client - 1], sketches["q"].sent))]

    stages = masked_stages([1, 2, 3, 4], threshold=3, seed=11, stages=plan.passes, vectors=vectors)
    secure = server_step(plan, 2, stages[1].sums[0], sketches["q"], torch.float64)
    plain, _ = secure_round(method, kept, updates, weights, 8.0, wrapping_sum, seed=0, dtype=torch.float64)
    for name in SHAPES:
        assert torch.equal(secure.delta.pairs[name].a, plain.delta.pairs[name].a)
        assert torch.equal(secure.kept.pairs[name].b, plain.kept.pairs[name].b)


def test_a_plan_refuses_weights_outside_0_1_and_a_scale_sized_for_fewer_clients():
    method = get_method("flora")
    with pytest.raises(ValueError, match=r"weights must lie in \[0, 1\]"):
        plan_round(method, None, SHAPES, [4, 4], [1.0, 1.0], [1.5, -0.5], CLIP, seed=0)
    with pytest.raises(ValueError, match="clients 1 is below this round's 2 participants"):
        plan_round(method, None, SHAPES, [4, 4], [1.0, 1.0], [0.5, 0.5], CLIP, seed=0, clients=1)
