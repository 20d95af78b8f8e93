"""The downlink: the smaller exact form per module, and lossy compression that loses nothing over a run."""

from __future__ import annotations

import pytest
import torch

from flora.common.aggregation import flora_stack
from flora.common.canonical import canonical_pair
from flora.common.downlink import DownlinkPolicy, plan_downlink
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling
from flora.common.merge import merged_update
from flora.common.payload import PayloadError, PayloadMeta, encode_update, encode_weights, read_update
from flora.common.update import cumulative_factors, is_factors, module_delta, module_energy, module_numel

# A wide module (factors win until R = 12 * 40 / 52, about 9) and a square one (until R = 16).
SHAPES = {"m.q": (12, 40), "m.v": (32, 32)}


def round_stack(ranks: list[int], seed: int, shapes=SHAPES, decay: float = 0.0) -> tuple[dict[str, LoraPair], list, list]:
    """A round's stacked aggregate (float32, as the server stacks) and the clients behind it."""
    gen = torch.Generator().manual_seed(seed)
    adapters = []
    for k, rank in enumerate(ranks):
        pairs = {}
        for name, (d_out, d_in) in shapes.items():
            scale = torch.exp(-decay * torch.arange(rank, dtype=torch.float32))  # a spectrum that decays
            pairs[name] = LoraPair(torch.randn(rank, d_in, generator=gen) * scale[:, None], torch.randn(d_out, rank, generator=gen))
        adapters.append(LoraAdapter(pairs, lora_scaling(rank, 4.0 * (k + 1))))
    raw = torch.rand(len(ranks), generator=gen) + 0.2
    weights = (raw / raw.sum()).tolist()
    return dict(flora_stack(adapters, weights).pairs), adapters, weights


def exact_sum(adapters, weights, name) -> torch.Tensor:
    return sum(p * a.delta(name, torch.float64) for a, p in zip(adapters, weights))


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(x.double() - y.double()) / torch.linalg.matrix_norm(y.double())).item()


@pytest.mark.parametrize("ranks", [[2, 3], [4, 4, 4], [2, 6, 1, 9]])
def test_each_module_takes_the_smaller_exact_form(ranks):
    stack, adapters, weights = round_stack(ranks, seed=len(ranks))
    downlink = plan_downlink(stack)
    assert downlink.remainder == {}
    for name, (d_out, d_in) in SHAPES.items():
        part = downlink.update[name]
        rho = canonical_pair(stack[name]).a.shape[0]
        assert module_numel(part) == min(rho * (d_out + d_in), d_out * d_in)
        assert module_numel(part) <= stack[name].a.numel() + stack[name].b.numel()
        assert rel(module_delta(part, torch.float64), exact_sum(adapters, weights, name)) < 1e-5
    forms = {name: is_factors(part) for name, part in downlink.update.items()}
    assert forms == {"m.q": sum(ranks) <= 9, "m.v": sum(ranks) < 16}


def test_the_downlink_depends_on_the_sum_alone():
    stack, adapters, weights = round_stack([3, 2, 4], seed=7)
    # The same sum from other clients: one client whose factors are a rotation of the whole stack.
    gen = torch.Generator().manual_seed(1)
    other = {}
    for name, pair in stack.items():
        q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64, generator=gen))
        other[name] = LoraPair((q.T @ pair.a.double()).float(), (pair.b.double() @ q).float())
    first, second = plan_downlink(stack).update, plan_downlink(other).update
    for name in SHAPES:
        x, y = first[name], second[name]
        assert is_factors(x) == is_factors(y)
        for t, u in zip(x, y) if is_factors(x) else [(x, y)]:
            assert rel(u, t) < 1e-5
        # No slice of what is sent is any client's own factors.
        if is_factors(x):
            for adapter in adapters:
                a_k, b_k = adapter.pairs[name]
                for start in range(x.a.shape[0] - adapter.rank + 1):
                    assert not torch.allclose(x.b[:, start : start + adapter.rank], b_k, rtol=1e-3)


def test_merged_model_is_exact_over_rounds_with_mixed_forms():
    base = {name: torch.randn(*shape, generator=torch.Generator().manual_seed(3)) for name, shape in SHAPES.items()}
    weights_now, truth = dict(base), {n: w.double() for n, w in base.items()}
    forms = set()
    for number, ranks in enumerate([[2, 3], [8, 8], [1]]):  # factors, dense, factors
        stack, adapters, p = round_stack(ranks, seed=10 + number)
        downlink = plan_downlink(stack)
        forms |= {is_factors(part) for part in downlink.update.values()}
        weights_now = merged_update(weights_now, downlink.update)
        for name in SHAPES:
            truth[name] = truth[name] + exact_sum(adapters, p, name)
    assert forms == {True, False}
    for name in SHAPES:
        assert rel(weights_now[name] - base[name], truth[name] - base[name].double()) < 1e-5


@pytest.mark.parametrize(
    "policy",
    [DownlinkPolicy(energy=0.9), DownlinkPolicy(max_rank=2), DownlinkPolicy(dtype=torch.bfloat16),
     DownlinkPolicy(energy=0.95, max_rank=3, dtype=torch.float16)],
)
def test_compression_carries_what_it_does_not_send(policy):
    total = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    sent = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    remainder = {}
    retained = []
    for number in range(4):
        stack, adapters, p = round_stack([2, 3], seed=20 + number, decay=0.7)
        downlink = plan_downlink(stack, remainder, policy)
        remainder = downlink.remainder
        retained.append(downlink.summary()["retained_energy"])
        for name in SHAPES:
            total[name] += exact_sum(adapters, p, name)
            sent[name] += module_delta(downlink.update[name], torch.float64)
    for name in SHAPES:
        carried = module_delta(remainder[name], torch.float64) if name in remainder else 0
        assert rel(sent[name] + carried, total[name]) < 1e-5
        assert rel(sent[name], total[name]) > 1e-6  # it really was lossy
    assert all(0.0 < r < 1.0 for r in retained)
    if policy.max_rank:
        assert all(not is_factors(part) or part.a.shape[0] <= policy.max_rank for part in downlink.update.values())
    assert all(part.dtype == policy.dtype for update in [downlink.update] for part in
               [t for v in update.values() for t in (v if is_factors(v) else [v])])


def test_summary_reports_forms_ranks_energy_and_remainder():
    stack, *_ = round_stack([2, 3], seed=4, decay=0.5)
    exact = plan_downlink(stack).summary()
    assert exact == {"factor_modules": 2, "dense_modules": 0, "rank_min": 5, "rank_max": 5,
                     "retained_energy": pytest.approx(1.0, rel=1e-5), "remainder_norm": 0.0}
    lossy = plan_downlink(stack, policy=DownlinkPolicy(max_rank=1)).summary()
    assert lossy["rank_max"] == 1 and lossy["retained_energy"] < 1.0 and lossy["remainder_norm"] > 0.0


def test_policy_limits_are_named():
    with pytest.raises(ValueError, match="energy"):
        DownlinkPolicy(energy=0.0)
    with pytest.raises(ValueError, match="max_rank"):
        DownlinkPolicy(max_rank=0)
    with pytest.raises(ValueError, match="dtype"):
        DownlinkPolicy(dtype=torch.float64)


def test_cumulative_factors_are_exact_and_bounded():
    updates, truth = [], {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    for number in range(6):
        stack, adapters, p = round_stack([4, 5], seed=40 + number)
        updates.append(plan_downlink(stack).update)
        for name in SHAPES:
            truth[name] += exact_sum(adapters, p, name)
    total = cumulative_factors(updates)
    for name, (d_out, d_in) in SHAPES.items():
        assert total[name].a.shape[0] <= min(d_out, d_in)
        assert rel(total[name].b @ total[name].a, truth[name]) < 1e-5


def test_update_payload_round_trips_and_is_validated():
    stack, *_ = round_stack([8, 8], seed=2)  # m.q dense, m.v factors
    update = plan_downlink(stack).update
    meta = PayloadMeta("global_update", round=3, version=3)
    data = encode_update(update, meta)
    loaded, got = read_update(data, SHAPES)
    assert got == meta
    for name in SHAPES:
        assert is_factors(loaded[name]) == is_factors(update[name])
        assert torch.equal(module_delta(loaded[name]), module_delta(update[name]))
    merged = encode_weights({n: module_delta(p) for n, p in update.items()}, PayloadMeta("merged_modules", version=3))
    with pytest.raises(PayloadError, match="not a downlink update"):
        read_update(merged, SHAPES)
    wide = {**update, "m.v": LoraPair(torch.zeros(33, 32), torch.zeros(32, 33))}
    with pytest.raises(PayloadError, match="rank 33 is outside"):
        read_update(encode_update(wide, meta), SHAPES)
    with pytest.raises(PayloadError, match="missing tensor"):
        read_update(encode_update({"m.q": update["m.q"]}, meta), SHAPES)


def test_energy_of_a_dense_delta_matches_float64_and_survives_float32_overflow():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(300, 200, generator=gen)
    assert module_energy(delta) == pytest.approx(float(delta.double().square().sum()), rel=1e-6)
    huge = torch.full((4, 4), 1e20)  # each square, 1e40, is beyond float32's 3.4e38
    assert module_energy(huge) == pytest.approx(float(huge.double().square().sum()), rel=1e-12)  # 1.6e41
