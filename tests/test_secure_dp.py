"""Differential privacy together with secure aggregation (issues 30 and 31).

The clients clip (to the DP clip norm, in the norm of what is released) and weight before
masking; the server adds the release's noise to the unmasked sums. Held to the plain private
release of the same updates with the same noise (in process, and through the server's
``SecureRounds`` and the clients' ``secure_stages``), to the clipping bound per client, and to
the announced noise scale; then a real server and clients run a private secure round over gRPC.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import get_method
from flora.common.methods.base import canonical_adapter
from flora.common.omega import round_seed
from flora.common.privacy.private_round import Privacy, private_round
from flora.common.privacy.release import noise_std
from flora.common.robust import RobustPolicy
from flora.common.secagg.contribution import client_change, client_contribution
from flora.common.secagg.finish import Noise, Sketch, released_sum, server_step
from flora.common.secagg.fixedpoint import decode, wrapping_sum
from flora.common.secagg.plan import FACTORS, plan_round, round_weights, sketch_bases, vector_length
from flora.common.secagg.secure_round import secure_round
from flora.common.weights import client_weights
from flora.server.config import ServerSettings
from harness import server_factory  # noqa: F401 - a pytest fixture

SHAPES = {"m.k": (12, 10), "m.q": (96, 80)}  # under the sketch release: one module dense by the rule, one sketched
RANKS = [4, 2, 1, 1]
CLAIMED = [40.0, 10.0, 20.0, 30.0]
CAP = 0.35  # max_weight_share: the 40 is capped
DP_CLIP, SIGMA, RUN_SEED, NUMBER = 0.5, 1.3, 11, 4
METHODS = ("flora", "flora-warm", "flexlora", "ffa")


def kept_for(method: str) -> LoraAdapter | None:
    """The global LoRA a later round starts from (nonzero B), or None for flora."""
    generator = torch.Generator().manual_seed(3)
    def factors(rank: int, scale: float) -> dict[str, LoraPair]:
        return {n: LoraPair(torch.randn(rank, i, generator=generator, dtype=torch.float64) * scale,
                            torch.randn(o, rank, generator=generator, dtype=torch.float64) * scale)
                for n, (o, i) in SHAPES.items()}
    if method == "flora":
        return None
    if method == "ffa":
        return LoraAdapter(factors(max(RANKS), 0.3), 2.0)
    return canonical_adapter(LoraAdapter(factors(4, 0.3), 1.0))


def trained(method_name: str, kept: LoraAdapter | None, seed: int) -> list[LoraAdapter]:
    """Mixed-rank updates, each client's start moved by a step of its own size: some changes far
    above the DP clip norm, some below it."""
    method, generator = get_method(method_name), torch.Generator().manual_seed(seed)
    updates = []
    for k, rank in enumerate(RANKS):
        step = (0.002, 0.3, 0.05, 1.0)[k]
        scaling = kept.scaling if method.one_scaling else 2.0 / rank
        init = method.cached_start(kept, rank, scaling).init
        pairs = {}
        for name, (d_out, d_in) in SHAPES.items():
            a = torch.randn(rank, d_in, generator=generator, dtype=torch.float64) / math.sqrt(d_in) if init is None else init.pairs[name].a
            b = torch.zeros(d_out, rank, dtype=torch.float64) if init is None else init.pairs[name].b
            moved_a = a if not method.trains_a or init is None else a + torch.randn(a.shape, generator=generator, dtype=torch.float64) * step
            pairs[name] = LoraPair(moved_a, b + torch.randn(b.shape, generator=generator, dtype=torch.float64) * step)
        updates.append(LoraAdapter(pairs, scaling))
    return updates


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


def plan_for(method_name: str, kept: LoraAdapter | None, kind: str = "sketch", secure_clip: float | None = None):
    return plan_round(get_method(method_name), kept, SHAPES, RANKS, [u.scaling for u in trained(method_name, kept, 0)],
                      round_weights(CLAIMED, CAP), secure_clip, round_seed(RUN_SEED, NUMBER), dp_clip_norm=DP_CLIP,
                      dense=kind == "dense")


@pytest.mark.parametrize("secure_clip", [None, 0.3])
@pytest.mark.parametrize("kind", ["sketch", "dense"])
@pytest.mark.parametrize("method_name", METHODS)
def test_a_private_secure_round_is_the_plain_private_release_of_the_same_updates_and_noise(method_name, kind, secure_clip):
    method, kept = get_method(method_name), kept_for(method_name)
    updates = trained(method_name, kept, 1)
    privacy = Privacy(SIGMA, DP_CLIP, kind, RUN_SEED)
    policy = RobustPolicy(max_weight_share=CAP, clip_norm=secure_clip)  # the secure clip bound, as the plain clip_norm
    plain, clipped, _ = private_round(method, kept, updates, CLAIMED, policy, privacy, NUMBER, torch.Generator().manual_seed(7))
    weights = round_weights(CLAIMED, CAP)
    assert weights == clipped.weights and max(weights) == CAP

    def secure(sigma: float):
        return secure_round(method, kept, updates, weights, secure_clip, wrapping_sum, round_seed(RUN_SEED, NUMBER),
                            torch.float64, Privacy(sigma, DP_CLIP, kind, RUN_SEED), torch.Generator().manual_seed(7))

    result, clips = secure(SIGMA)
    assert clips == pytest.approx(clipped.clips, rel=1e-12) and min(clips) < 0.5 and max(clips) == 1.0
    quiet, _ = secure(0.0)
    for name in SHAPES:
        want = plain.delta.delta(name, torch.float64)
        assert relative(result.delta.delta(name, torch.float64), want) <= 1e-9, name
        assert relative(quiet.delta.delta(name, torch.float64), want) > 1e-3, name  # the noise is really in both
        if plain.kept is not None:
            assert relative(result.kept.delta(name, torch.float64), plain.kept.delta(name, torch.float64)) <= 1e-9, name
    plan = plan_for(method_name, kept, kind, secure_clip)
    layout = {m.name: (m.dense, m.columns > 0) for m in plan.modules}
    if plan.kind == FACTORS:
        assert plan.passes == 1
    elif kind == "dense":
        assert plan.passes == 1 and all(dense for dense, _ in layout.values())
    else:  # a mixed round: both passes, and a module that travels (and is noised) dense in pass 1
        assert plan.passes == 2 and layout == {"m.k": (True, False), "m.q": (False, True)}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method_name", METHODS)
def test_no_client_contributes_more_than_its_weight_times_c_to_a_masked_sum(method_name, seed):
    kept = kept_for(method_name)
    plan = plan_for(method_name, kept)
    changes = [client_change(plan, k, u) for k, u in enumerate(trained(method_name, kept, seed))]
    assert min(c.clip for c in changes) < 0.5 and max(c.clip for c in changes) == 1.0
    bases, sketch = sketch_bases(plan), None
    for stage in range(1, plan.passes + 1):
        vectors = [np.concatenate(client_contribution(plan, stage, c, bases if stage == 1 else sketch.sent)) for c in changes]
        for change, vector in zip(changes, vectors):  # each client's part of the sum, as the masks hide it
            assert float(np.linalg.norm(decode(vector, plan.bits))) <= plan.weights[change.index] * DP_CLIP * (1 + 1e-9)
        sketch = server_step(plan, stage, wrapping_sum(vectors), sketch, torch.float64)
        assert isinstance(sketch, Sketch) == (stage < plan.passes)
    if plan.kind == FACTORS:  # ffa clips the released quantity |B_k - B_start|_F itself, not |s dB A|_F
        for change in changes:
            norm = math.sqrt(sum(float(t.square().sum()) for t in change.parts.values()))
            assert norm <= plan.weights[change.index] * DP_CLIP * (1 + 1e-12)


@pytest.mark.parametrize("method_name", ["flora", "ffa"])
def test_the_noise_on_each_unmasked_sum_has_the_announced_std(method_name):
    kept = kept_for(method_name)
    plan = plan_for(method_name, kept)
    changes = [client_change(plan, k, u) for k, u in enumerate(trained(method_name, kept, 2))]
    std = noise_std(SIGMA, DP_CLIP, plan.weights)
    assert std == pytest.approx(SIGMA * DP_CLIP * CAP)
    noise, bases = Noise(SIGMA, torch.Generator().manual_seed(1234)), sketch_bases(plan)
    for stage in range(1, plan.passes + 1):
        summed = wrapping_sum([np.concatenate(client_contribution(plan, stage, c, bases)) for c in changes])
        noisy, clear = released_sum(plan, stage, summed, noise), released_sum(plan, stage, summed)
        drawn = torch.cat([(noisy[n] - clear[n]).flatten() for n in clear])
        assert drawn.numel() >= 400
        # >= 400 entries: the estimate is within ~4% of the truth; 0.8x or 1.25x sigma fails.
        assert 0.85 * std < float(drawn.std()) < 1.15 * std
        assert abs(float(drawn.mean())) < 0.2 * std
        if stage == 1 and plan.passes == 2:
            bases = server_step(plan, 1, summed, dtype=torch.float64, noise=noise).q


def test_noise_without_the_plans_dp_clip_norm_and_a_dp_clip_norm_that_is_not_positive_are_refused():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="dp_clip_norm must be a positive finite number"):
            plan_round(get_method("flora"), None, SHAPES, RANKS, [1.0] * 4, [0.25] * 4, 1.0, 5, dp_clip_norm=bad)
    plan = plan_round(get_method("flora"), None, SHAPES, RANKS, [1.0] * 4, [0.25] * 4, 1.0, 5)
    with pytest.raises(ValueError, match="dp_clip_norm"):
        released_sum(plan, 1, np.zeros(vector_length(plan, 1), dtype=np.uint64),
                     Noise(1.0, torch.Generator()))


@pytest.mark.parametrize(("method_name", "kind"), [("flora", "sketch"), ("flora-warm", "dense"), ("ffa", "sketch")])
def test_the_servers_secure_rounds_and_the_clients_stages_release_what_the_plain_server_releases(
        method_name, kind, monkeypatch):
    from test_secure_wire import RANKS as WIRE_RANKS, method_round, secure_round as wire_round

    import flora.server.secure_round as server_secure

    monkeypatch.setattr(server_secure, "secret_generator", lambda: torch.Generator().manual_seed(7))
    kept, updates = method_round(method_name)
    examples = [10, 20, 30]
    result, decisions, _, secure = wire_round(method_name, kept, updates, examples, dp_noise_multiplier=SIGMA,
                                              dp_clip_norm=DP_CLIP, dp_release=kind)
    settings = secure.settings
    assert settings.weighting.value == "uniform"  # DP's default: counts are not public unless chosen
    assert [d.weight for d in decisions] == pytest.approx([1 / 3] * 3)
    claimed = client_weights(examples, settings.weighting.value)
    plain, clipped, _ = private_round(get_method(method_name), kept, updates, claimed, RobustPolicy(),
                                      Privacy(SIGMA, DP_CLIP, kind, settings.seed), 1, torch.Generator().manual_seed(7))
    assert min(clipped.clips) < 1.0 and len(WIRE_RANKS) == 3
    for name in updates[0].pairs:
        assert relative(result.delta.delta(name, torch.float64), plain.delta.delta(name, torch.float64)) <= 1e-9, name
        if plain.kept is not None:
            assert relative(result.kept.delta(name, torch.float64), plain.kept.delta(name, torch.float64)) <= 1e-9, name


def test_a_client_recovered_after_sharing_leaves_the_plain_release_over_the_survivors(monkeypatch):
    # The survivors' weights are renormalized, and so is the noise's scale (sigma C max_k p_k).
    # (The dense release: a sketch keeps the m planned over every client that shared.)
    from test_secure_wire import method_round, secure_round as wire_round

    import flora.server.secure_round as server_secure

    monkeypatch.setattr(server_secure, "secret_generator", lambda: torch.Generator().manual_seed(8))
    kept, updates = method_round("flora")
    result, decisions, output, _ = wire_round("flora", kept, updates, [1, 1, 1], silent={0: "mask1"},
                                              dp_noise_multiplier=SIGMA, dp_clip_norm=DP_CLIP, dp_release="dense")
    assert output.secure["dropouts_recovered"] == 1 and [d.weight for d in decisions] == pytest.approx([0.0, 0.5, 0.5])
    plain, _, released = private_round(get_method("flora"), None, updates[1:], [0.5, 0.5], RobustPolicy(),
                                       Privacy(SIGMA, DP_CLIP, "dense", 0), 1, torch.Generator().manual_seed(8))
    assert released.std == pytest.approx(SIGMA * DP_CLIP * 0.5)
    for name in updates[0].pairs:
        assert relative(result.delta.delta(name, torch.float64), plain.delta.delta(name, torch.float64)) <= 1e-9, name


def test_under_dp_the_secure_clip_bound_is_clip_norm_alone_never_max_update_norm():
    # A plain private round clips no upload to max_update_norm (it accepts every one and clips
    # it to dp_clip_norm), so neither may a private secure round's clients.
    from test_secure_wire import setup

    private, aggregator, _, _ = setup("flora", None, 5.0, dp_noise_multiplier=SIGMA, dp_clip_norm=DP_CLIP)
    plain, plain_aggregator, _, _ = setup("flora")
    aggregator.max_update_norm = plain_aggregator.max_update_norm = 0.01
    assert private.clip_norm is None and plain.clip_norm == 0.01
    fixed, _, _, _ = setup("flora", None, 5.0, dp_noise_multiplier=SIGMA, dp_clip_norm=DP_CLIP, clip_norm=0.2)
    assert fixed.clip_norm == 0.2
    with pytest.raises(ValueError, match="needs a clip bound"):
        plan_round(get_method("flora"), None, SHAPES, RANKS, [1.0] * 4, [0.25] * 4, None, 5)


@pytest.mark.parametrize("method", METHODS)
def test_dp_with_secure_aggregation_is_accepted_and_the_remaining_refusals_name_why(method):
    settings = ServerSettings(method=method, secure_aggregation=True, dp_noise_multiplier=1.0, dp_clip_norm=0.5)
    assert settings.dp_enabled and settings.secure_aggregation
    with pytest.raises(ValueError, match="method fedit cannot run under differential privacy"):
        ServerSettings(method="fedit", lora_rank=4, secure_aggregation=True, dp_noise_multiplier=1.0, dp_clip_norm=0.5)
    with pytest.raises(ValueError, match="dp_noise_multiplier \\(sigma\\) and dp_clip_norm \\(C\\) go together"):
        ServerSettings(method=method, secure_aggregation=True, dp_noise_multiplier=1.0)


@pytest.mark.slow
def test_a_private_secure_run_over_grpc_completes_and_records_epsilon_and_secure(tmp_path, server_factory):  # noqa: F811
    from client_harness import ServerView
    from test_client_integration import RUN_FLAGS, assert_clients_hold_the_servers_model, finish, start

    server = server_factory(*RUN_FLAGS, "--rounds", "1", "--min-clients", "3", "--secure-aggregation",
                            "--dp-noise-multiplier", "1.0", "--dp-clip-norm", "0.5", state_dir=tmp_path / "state")
    clients = [start(tmp_path, server.address, name, rank) for name, rank in (("r4", 4), ("r2", 2), ("r1", 1))]
    finish(clients)
    assert_clients_hold_the_servers_model(tmp_path, server.address, clients, 1)
    view = ServerView(server.address, clients[0].identity().token)
    try:
        run = view.status().run
    finally:
        view.close()
    assert (run.dp_noise_multiplier, run.dp_clip_norm, run.dp_release, run.secure_aggregation) == (1.0, 0.5, "sketch", True)
    history = [json.loads(line) for line in (tmp_path / "state" / "history.jsonl").read_text().splitlines()]
    (line,) = [r for r in history if r["round"] == 1]
    assert line["secure_aggregation"] is True and line["secure"]["survivors"] == 3
    assert line["dp_epsilon"] > 0 and 0 < line["dp_delta"] < 1 / 3
    assert line["aggregation_error"] is None
