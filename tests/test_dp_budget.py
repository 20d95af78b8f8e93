"""The spent privacy budget (issue 31 item 3): composed per committed round, checked before a round opens.

Unit tests of the pure parts: the accountant over rounds of differing samples against
dp-accounting's own composition and a published reference point, the round machine's uniform
DP sampling and its gate, and the budget read back from a history.
"""

from __future__ import annotations

import pytest

dp = pytest.importorskip("dp_accounting")

from flora.common.privacy.accountant import epsilon_after_rounds, epsilon_of_releases, epsilon_of_rounds
from flora.server.admin.console import privacy_line, render_plain
from flora.server.admin.report import privacy_lines
from flora.server.privacy_budget import PrivacyBudget, ended_before
from flora.server.rounds import Abandoned, Ended, Opened, Selection
from flora.v1 import coordinator_pb2 as pb
from test_dp_settings import DP
from test_rounds import SHA_A, machine_with
from test_server_config import settings_from

DELTA = 1e-5
SAMPLES = [(10, 3), (12, 3), (10, 3), (8, 8), (12, 4)]


@pytest.mark.parametrize("passes", [1, 2])
def test_rounds_of_differing_samples_compose_as_dp_accounting_composes_them(passes):
    ours = epsilon_of_rounds(2.0, SAMPLES, passes, DELTA, "rdp")
    theirs = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    for n, k in SAMPLES:  # one event per round, in order: composition does not care about grouping
        gaussian = dp.SelfComposedDpEvent(dp.GaussianDpEvent(2.0 / 2), passes)  # replace-one: sensitivity 2C
        theirs.compose(dp.SampledWithoutReplacementDpEvent(n, k, gaussian))
    assert ours == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-9)


def test_pld_rounds_compose_as_dp_accounting_composes_them():
    ours = epsilon_of_rounds(2.0, SAMPLES, 1, DELTA, "pld")
    theirs = dp.pld.PLDAccountant(value_discretization_interval=1e-3)
    for n, k in SAMPLES:
        gaussian = dp.GaussianDpEvent(2.0)
        theirs.compose(gaussian if n == k else dp.PoissonSampledDpEvent(k / n, gaussian))
    assert ours == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-3)


# (population, selected, mechanisms): committed rounds of 2 passes and of 1, and abandoned secure
# attempts' first passes (1 mechanism each), interleaved as a run meets them.
MIXED = [(10, 3, 2), (12, 3, 1), (10, 3, 2), (10, 3, 1), (8, 8, 1)]


def test_releases_of_mixed_mechanism_counts_compose_as_dp_accounting_composes_them():
    ours = epsilon_of_releases(2.0, MIXED, DELTA, "rdp")
    theirs = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    for n, k, mechanisms in MIXED:  # each entry's mechanisms see the same sample: composed inside it
        gaussian = dp.SelfComposedDpEvent(dp.GaussianDpEvent(2.0 / 2), mechanisms)
        theirs.compose(dp.SampledWithoutReplacementDpEvent(n, k, gaussian))
    assert ours == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-9)
    assert epsilon_of_rounds(2.0, [(10, 3)], 2, DELTA) < epsilon_of_releases(2.0, [(10, 3, 2), (10, 3, 1)], DELTA)
    pld = dp.pld.PLDAccountant(value_discretization_interval=1e-3)
    for n, k, mechanisms in MIXED:  # m Gaussians of one sample are one Gaussian of multiplier sigma / sqrt(m)
        gaussian = dp.GaussianDpEvent(2.0 / mechanisms ** 0.5)
        pld.compose(gaussian if n == k else dp.PoissonSampledDpEvent(k / n, gaussian))
    assert epsilon_of_releases(2.0, MIXED, DELTA, "pld") == pytest.approx(pld.get_epsilon(DELTA), rel=1e-3)


def test_equal_samples_give_the_planned_curve_and_no_round_spends_nothing():
    assert epsilon_of_rounds(3.0, [(20, 5)] * 6, 2, DELTA) == pytest.approx(epsilon_after_rounds(3.0, 20, 5, 6, 2, DELTA)[-1])
    assert epsilon_of_rounds(3.0, [], 2, DELTA) == 0.0


def test_published_reference_point_dong_roth_su_2020():
    """Dong, Roth and Su, "Gaussian Differential Privacy" (JRSS-B 2022; HDSR 2020 summary, Figure 4):
    noisy SGD on MNIST with sampling rate 256/60000, sigma 1.3, 20 epochs, delta 1e-5 is (1.34, 1e-5)-DP
    by the moments accountant. PLD accounts the same Poisson-sampled Gaussian exactly up to its
    pessimistic discretisation, so it may only be tighter, and not by much."""
    steps = 20 * 60000 // 256
    eps = epsilon_of_rounds(1.3, [(60000, 256)] * steps, 1, DELTA, "pld")
    assert 0.9 < eps <= 1.34


def test_a_dp_round_samples_uniformly_and_records_the_sample():
    machine = machine_with(["a", "b", "c", "d", "e"], selection=Selection("count", 2), fresh_attempts=True)
    (opened,) = machine.advance(0.0)
    assert (opened.round.population, opened.round.sampled, len(opened.round.selected)) == (5, 2, 2)


def test_a_dp_sample_cannot_be_recomputed_from_the_run_seed():
    """Amplification by sampling needs a sample nobody can recompute: under DP the same seed,
    round and attempt must not give the same selection (20 choose 3: ten equal draws by chance
    have probability 1140^-9)."""
    clients = [f"c{i:02d}" for i in range(20)]
    picks = set()
    for _ in range(10):
        machine = machine_with(clients, selection=Selection("count", 3), fresh_attempts=True, seed=7)
        (opened,) = machine.advance(0.0)
        picks.add(opened.round.selected)
    assert len(picks) > 1


def test_an_abandoned_dp_attempt_drops_its_updates_and_the_next_samples_afresh():
    machine = machine_with(["a", "b", "c", "d"], quorum=1.0, fresh_attempts=True)
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    for client in ("a", "c", "d"):
        machine.seen(client, 90.0)  # b went silent
    abandoned, reopened = machine.advance(100.0)
    assert isinstance(abandoned, Abandoned) and abandoned.dropped == ("a",)
    assert isinstance(reopened, Opened) and reopened.round.accepted == {}
    assert (reopened.round.population, reopened.round.sampled) == (3, 3)


def test_without_dp_an_abandoned_attempt_keeps_its_updates():
    machine = machine_with(["a", "b", "c"], quorum=1.0)
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    machine.seen("a", 90.0)
    machine.seen("c", 90.0)
    abandoned, reopened = machine.advance(100.0)
    assert abandoned.dropped == () and reopened.round.accepted == {"a": SHA_A}


def test_the_gate_refuses_a_round_and_the_run_ends_at_the_version_before():
    machine = machine_with(["a", "b", "c"])
    asked = []
    machine.gate = lambda number, population, selected: asked.append((number, population, selected)) or (
        "no" if number == 2 else None)
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    machine.accept("b", 1, "b" * 64, 1.0)
    machine.accept("c", 1, "c" * 64, 1.0)
    machine.aggregated(1)
    (ended,) = machine.advance(2.0)
    assert ended == Ended(2, 1, "no") and asked == [(1, 3, 3), (2, 3, 3)]
    assert machine.finished and machine.version == 1 and machine.current is None
    assert machine.advance(3.0) == []


def _history(budget_settings, samples):
    budget = PrivacyBudget.of_run(budget_settings, [])
    history = [{"round": 0}]
    for number, (n, k) in enumerate(samples, 1):
        record = {"round": number, "attempts": 1, **budget.record(number, 1, n, k)}
        budget.committed(record)
        history.append(record)
    return budget, history


def test_the_budget_read_back_from_the_history_is_the_one_that_wrote_it():
    settings = settings_from(DP + ["--dp-target-epsilon", "30"])
    budget, history = _history(settings, [(2, 2), (3, 2)])
    again = PrivacyBudget.of_run(settings, history)
    assert again.samples == [(2, 2), (3, 2)] and again.spent == budget.spent == history[-1]["dp_epsilon"]
    assert history[1]["dp_epsilon"] < history[2]["dp_epsilon"] and history[2]["dp_delta"] == DELTA
    assert again.spent == pytest.approx(epsilon_of_rounds(4.0, [(2, 2), (3, 2)], 2, DELTA))


def test_the_runs_delta_is_its_first_rounds_even_when_min_clients_changes():
    _, history = _history(settings_from(DP + ["--min-clients", "20000"]), [(20000, 20000)])
    assert history[1]["dp_delta"] == pytest.approx(5e-6)
    assert PrivacyBudget.of_run(settings_from(DP), history).delta == pytest.approx(5e-6)


def test_refusal_names_the_round_the_epsilon_the_target_and_the_version_the_run_ends_at():
    settings = settings_from(DP + ["--dp-target-epsilon", "4"])
    budget, _ = _history(settings, [(2, 2)])
    second = budget.epsilon_after([(2, 2), (2, 2)])
    assert budget.spent < 4 < second  # 3.19, then 4.73
    assert budget.refusal(2, 2, 2) == (f"privacy budget: round 2 would spend epsilon {second:.4g} > target 4 "
                                       "(delta 1e-05, 2 of 2 clients); the run ends at version 1")
    assert budget.refusal(2, 2000, 2) is None  # a wider population amplifies more
    assert PrivacyBudget.of_run(settings_from(DP), []).refusal(1, 2, 2) is None  # no target: never refused
    assert PrivacyBudget.of_run(settings_from([]), []) is None
    assert ended_before(budget, True, 1, "1").startswith("privacy budget: round 2 would have passed target 4")
    assert ended_before(budget, True, 1, "4") == "" and ended_before(budget, False, 1, "1") == ""


def test_the_plan_names_the_last_round_the_target_allows():
    budget = PrivacyBudget.of_run(settings_from(DP + ["--dp-target-epsilon", "5"]), [])
    assert budget.last_round_within(2, 2, 10) == 2  # 3.19, 4.73, then 5.98
    assert budget.last_round_within(2, 2, 2) == 2 and budget.last_round_within(1000, 2, 10) == 10
    budget.samples, budget.spent = [(2, 2)], 3.19
    assert budget.last_round_within(2, 2, 10) == 2


def test_console_and_report_show_the_spent_budget():
    status = pb.StatusReply(state="finished", privacy=pb.PrivacyStatus(
        epsilon=3.5, delta=1e-5, target_epsilon=5, noise_multiplier=4, clip_norm=0.5, accountant="rdp",
        mechanisms_per_round=2, ended="privacy budget: round 2 would spend epsilon 6 > target 5"))
    status.recent_rounds.append(pb.RoundSummary(round=1, dp_epsilon=3.5))
    line = privacy_line(status)
    assert line.startswith("privacy: epsilon 3.5 spent of target 5 at delta 1e-05 (rdp") and "round 2 would spend" in line
    assert "epsilon" in render_plain(status, 0.0).splitlines()[-3] and privacy_line(pb.StatusReply()) == ""
    _, history = _history(settings_from(DP), [(2, 2)])
    text = "\n".join(privacy_lines(history[1:]))
    assert f"epsilon {history[1]['dp_epsilon']:.4g} at delta 1e-05 after 1 rounds" in text and "2 of 2" in text
    assert privacy_lines([{"round": 1}]) == []

