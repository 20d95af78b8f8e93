"""The privacy accountant and ``flora-admin dp-plan``: dp-accounting's own numbers, closed forms, the CLI."""

from __future__ import annotations

import math
import sys

import pytest

dp = pytest.importorskip("dp_accounting")

from flora.common.privacy import accountant as acc  # noqa: E402
from flora.common.privacy.accountant import PrivacyError, epsilon_after_rounds, sigma_for_epsilon  # noqa: E402
from flora.server.admin.cli import main as admin  # noqa: E402

DELTA = 1e-5


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std = mu (Balle & Wang, ICML 2018, Theorem 8)."""
    def delta_at(eps: float) -> float:
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)

    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize(("n", "k", "rounds", "passes", "sigma"),
                         [(10, 3, 7, 2, 1.0), (100, 10, 30, 1, 0.8), (10, 10, 5, 2, 1.5)])
def test_rdp_equals_dp_accountings_own_composition(n, k, rounds, passes, sigma):
    ours = epsilon_after_rounds(sigma, n, k, rounds, passes, DELTA, "rdp")
    theirs = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    per_round = dp.SampledWithoutReplacementDpEvent(n, k, dp.SelfComposedDpEvent(dp.GaussianDpEvent(sigma / 2), passes))
    theirs.compose(dp.SelfComposedDpEvent(per_round, rounds))
    assert len(ours) == rounds
    assert ours[-1] == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-9)


@pytest.mark.parametrize(("n", "k", "rounds", "passes", "sigma"), [(10, 3, 4, 1, 1.0), (10, 10, 3, 2, 1.5)])
def test_pld_equals_dp_accountings_own_composition(n, k, rounds, passes, sigma):
    ours = epsilon_after_rounds(sigma, n, k, rounds, passes, DELTA, "pld", at_rounds=[rounds])[0]
    theirs = dp.pld.PLDAccountant(value_discretization_interval=acc.PLD_DISCRETIZATION)
    gaussian = dp.GaussianDpEvent(sigma)
    event = gaussian if k == n else dp.PoissonSampledDpEvent(k / n, gaussian)
    theirs.compose(event, rounds * passes)  # passes composed one by one, not merged into one Gaussian
    assert ours == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-3)


@pytest.mark.parametrize(("rounds", "passes", "sigma"), [(1, 1, 1.0), (20, 2, 3.0)])
def test_pld_without_sampling_matches_the_analytic_gaussian(rounds, passes, sigma):
    # rounds * passes Gaussians of multiplier sigma are one of sqrt(rounds * passes) / sigma (add/remove, sensitivity C)
    exact = _analytic_gaussian_epsilon(math.sqrt(rounds * passes) / sigma, DELTA)
    ours = epsilon_after_rounds(sigma, 10, 10, rounds, passes, DELTA, "pld", at_rounds=[rounds])[0]
    assert exact <= ours <= exact * 1.01


def test_rdp_without_sampling_lies_between_the_exact_gaussian_and_the_zcdp_bound():
    rounds, passes, sigma = 10, 2, 4.0
    mu = 2 * math.sqrt(rounds * passes) / sigma  # replace-one: sensitivity 2C
    rho = mu**2 / 2  # zCDP of the composed Gaussian; eps <= rho + 2 sqrt(rho log 1/delta) (Bun & Steinke 2016)
    ours = epsilon_after_rounds(sigma, 10, 10, rounds, passes, DELTA, "rdp", at_rounds=[rounds])[0]
    assert _analytic_gaussian_epsilon(mu, DELTA) <= ours <= rho + 2 * math.sqrt(rho * math.log(1 / DELTA))


def test_abadi_setting_with_poisson_sampling_lands_near_the_published_bound():
    # The classic DP-SGD setting (Abadi et al. 2016: q = 0.01, sigma = 1.1, 10,000 steps, delta 1e-5), for which
    # an RDP/moments bound of about 8 is commonly quoted; PLD is an upper bound too, tighter, and of the same
    # order. The exact reference point is the analytic-Gaussian test above; this one guards the sampled path.
    eps = epsilon_after_rounds(1.1, 10_000, 100, 10_000, 1, DELTA, "pld", at_rounds=[10_000])[0]
    assert 4.0 < eps < 8.0


def test_epsilon_grows_with_rounds_and_falls_with_sigma():
    curve = epsilon_after_rounds(1.0, 10, 3, 6, 2, DELTA, "rdp")
    assert all(a < b for a, b in zip(curve, curve[1:]))
    by_sigma = [epsilon_after_rounds(s, 10, 3, 6, 2, DELTA, "pld", at_rounds=[6])[0] for s in (1.0, 2.0, 4.0)]
    assert by_sigma[0] > by_sigma[1] > by_sigma[2]
    dense, sketch = (epsilon_after_rounds(2.0, 10, 10, 6, p, DELTA, "rdp", at_rounds=[6])[0] for p in (1, 2))
    assert dense < sketch


@pytest.mark.parametrize(("n", "k", "accountant"), [(10, 10, "rdp"), (10, 10, "pld"), (10, 3, "pld")])
def test_sigma_for_target_spends_at_most_the_target_and_little_less(n, k, accountant):
    target, rounds = 3.0, 8
    sigma = sigma_for_epsilon(target, n, k, rounds, 2, DELTA, accountant)

    def spent(s: float) -> float:
        return epsilon_after_rounds(s, n, k, rounds, 2, DELTA, accountant, at_rounds=[rounds])[0]

    assert spent(sigma) <= target < spent(sigma / 1.001)


def test_unreachable_target_says_so():
    with pytest.raises(PrivacyError, match="target_epsilon 0.01 is unreachable after 1000 rounds"):
        sigma_for_epsilon(0.01, 10, 10, 1000, 2, DELTA, "rdp", max_sigma=2.0)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"num_clients": 0}, "num_clients"), ({"clients_per_round": 11}, "clients_per_round"),
    ({"rounds": 0}, "rounds"), ({"passes": 3}, "passes"), ({"delta": 1.0}, "delta"),
    ({"accountant": "moments"}, "accountant"), ({"sigma": 0.0}, "noise_multiplier"),
    ({"sigma": math.nan}, "noise_multiplier"), ({"at_rounds": [0]}, "at_rounds"),
])
def test_bad_parameters_are_named(kwargs, named):
    args = {"sigma": 1.0, "num_clients": 10, "clients_per_round": 10, "rounds": 3, "passes": 2, "delta": DELTA,
            "accountant": "rdp"} | kwargs
    with pytest.raises(PrivacyError, match=named):
        epsilon_after_rounds(**args)


def test_missing_dp_accounting_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(PrivacyError, match=r"pip install 'flora-fl\[dp\]'"):
        epsilon_after_rounds(1.0, 10, 10, 3, 2, DELTA, "rdp")


def test_dp_plan_prints_the_plan_the_table_and_the_final_budget(capsys):
    assert admin(["dp-plan", "--clients", "10", "--clients-per-round", "3", "--rounds", "4",
                  "--noise-multiplier", "1.0"]) == 0
    out = capsys.readouterr().out.splitlines()
    final = epsilon_after_rounds(1.0, 10, 3, 4, 2, DELTA, "rdp")[-1]
    assert out[0] == ("plan: 10 clients, 3 per round, 4 rounds, sketch release (2 Gaussian mechanisms per round), "
                      "delta 1e-05")
    assert out[1].startswith("accounting: rdp, 3 of 10 sampled per round without replacement")
    assert [line.split("|")[1].strip() for line in out[3:] if line.startswith("| ") and "round" not in line] == \
        ["1", "2", "3", "4"]
    assert out[-1] == f"final: epsilon {final:.4g} at delta 1e-05 after 4 rounds"


def test_dp_plan_prints_the_sigma_for_a_target(capsys):
    assert admin(["dp-plan", "--clients", "10", "--rounds", "5", "--target-epsilon", "4", "--release", "dense",
                  "--accountant", "pld"]) == 0
    out = capsys.readouterr().out
    sigma = sigma_for_epsilon(4.0, 10, 10, 5, 1, DELTA, "pld")
    assert f"noise multiplier for target epsilon 4: {sigma:.4g}\n" in out
    assert "accounting: pld, no sampling (every client every round); add/remove neighbours (sensitivity C)" in out


def test_dp_plan_samples_rows_of_a_long_run():
    from flora.server.admin.dp_plan import _rows, default_delta

    rows = _rows(1000)
    assert rows[0] == 1 and rows[-1] == 1000 and len(rows) <= 21
    assert default_delta(10) == 1e-5 and default_delta(1_000_000) == pytest.approx(1e-7)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--rounds", "5", "--noise-multiplier", "1"], "--clients"),
    (["--clients", "ten", "--rounds", "5", "--noise-multiplier", "1"], "--clients"),
    (["--clients", "10", "--clients-per-round", "11", "--rounds", "5", "--noise-multiplier", "1"], "--clients-per-round"),
    (["--clients", "10", "--rounds", "0", "--noise-multiplier", "1"], "--rounds"),
    (["--clients", "10", "--rounds", "5", "--noise-multiplier", "-1"], "--noise-multiplier"),
    (["--clients", "10", "--rounds", "5", "--noise-multiplier", "1", "--delta", "0.5"], "--delta"),
    (["--clients", "10", "--rounds", "5", "--noise-multiplier", "1", "--release", "tree"], "--release"),
    (["--clients", "10", "--rounds", "5", "--noise-multiplier", "1", "--accountant", "gdp"], "--accountant"),
    (["--clients", "10", "--rounds", "5", "--target-epsilon", "nan"], "--target-epsilon"),
    (["--clients", "10", "--rounds", "5"], "--noise-multiplier"),
])
def test_dp_plan_bad_flags_exit_2_with_one_line_naming_the_flag(capsys, argv, flag):
    assert admin(["dp-plan", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flora-admin dp-plan: ") and flag in lines[0]
