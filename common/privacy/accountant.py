"""The privacy accountant: the (epsilon, delta) that client-level DP-FedAvg spends over a run.

The mechanism accounted (McMahan et al., ICLR 2018, as issue 31 specifies it): each round the
server samples ``clients_per_round`` of ``num_clients`` data holders uniformly without
replacement (a fixed count, as flora samples them), clips each one's change to norm C, and
releases ``passes`` Gaussian mechanisms of noise standard deviation ``sigma * C`` on the sum
(2 for the two-pass sketch release, 1 for the dense release). A whole data holder is the unit
protected. Rounds compose. The numbers come from Google's ``dp-accounting``:

- ``rdp``: Renyi DP with dp-accounting's sampled-without-replacement Gaussian (Wang, Balle,
  Kasiviswanathan, AISTATS 2019, Theorem 27), which matches flora's fixed-count sampling. That
  bound holds for the replace-one neighbouring relation (one data holder's data swapped for
  another's; the number of clients is public), under which the sum of clipped changes has
  sensitivity 2C, so the accountant's noise multiplier is ``sigma / 2``.
- ``pld``: privacy loss distributions, tighter, but dp-accounting has no sampled-without-
  replacement event for them, so this accounts *Poisson* sampling at q = k / n under add/remove
  (sensitivity C, multiplier ``sigma``). flora does not sample that way, and Poisson accounting
  can understate epsilon for fixed-size sampling (Lebeda et al., 2024): use it for comparison.

With ``clients_per_round == num_clients`` nothing is sampled and there is no amplification. The
``passes`` releases of one round see the same clients, so they are one Gaussian of multiplier
``m / sqrt(passes)`` (Mironov, Talwar, Zhang 2019, section 3; dp-accounting's RDP accountant
uses the same identity for composed Gaussians under sampling). A release that is not a whole
round (the noisy first pass of an abandoned secure attempt) is one mechanism on its own sample:
``epsilon_of_releases`` composes entries of any mechanism count.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

Accountant = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
MAX_ROUNDS = 1_000_000
MAX_SIGMA = 100.0
MIN_SEARCHED_SIGMA = 0.1  # below it a round leaks nearly everything; PLD grids also explode in memory there
DEFAULT_DELTA_CAP = 1e-5
PLD_DISCRETIZATION = 1e-3  # pessimistic rounding keeps it an upper bound; 1e-4 (the default) is ~8x slower for 1e-7 relative
INSTALL_HINT = "pip install 'flora-fl[dp]' (or: pip install 'dp-accounting>=0.4')"


class PrivacyError(ValueError):
    """A parameter outside its range, or a target no noise level within bounds reaches."""


def default_delta(num_clients: int) -> float:
    """min(1e-5, 1 / (10 N)): always below 1 / N, the level at which delta can hide a whole client."""
    return min(DEFAULT_DELTA_CAP, 1.0 / (10.0 * num_clients))


def check_installed() -> None:
    """Raise PrivacyError naming the install when dp-accounting is missing: a DP run needs it up front."""
    _dp()


def _dp() -> Any:
    try:
        import dp_accounting
    except ImportError as err:
        raise PrivacyError(f"the privacy accountant needs dp-accounting: {INSTALL_HINT}") from err
    return dp_accounting


def _check(num_clients: int, clients_per_round: int, rounds: int, passes: int, delta: float,
           accountant: str) -> None:
    if not 1 <= num_clients:
        raise PrivacyError(f"num_clients {num_clients} must be at least 1")
    if not 1 <= clients_per_round <= num_clients:
        raise PrivacyError(f"clients_per_round {clients_per_round} is outside 1..num_clients ({num_clients})")
    if not 1 <= rounds <= MAX_ROUNDS:
        raise PrivacyError(f"rounds {rounds} is outside 1..{MAX_ROUNDS}")
    if passes not in (1, 2):
        raise PrivacyError(f"passes {passes} must be 1 (dense release) or 2 (sketch release)")
    if not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta {delta} is outside (0, 1)")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant {accountant!r} must be one of {', '.join(ACCOUNTANTS)}")


def _check_sigma(sigma: float) -> None:
    if not (math.isfinite(sigma) and 0.0 < sigma <= MAX_SIGMA):
        raise PrivacyError(f"noise_multiplier {sigma} is outside (0, {MAX_SIGMA}]")


def round_event(sigma: float, num_clients: int, clients_per_round: int, passes: int, accountant: str) -> Any:
    """The dp-accounting event of one round, so that callers and tests see exactly what is composed."""
    dp = _dp()
    if accountant == "rdp":
        gaussian = dp.GaussianDpEvent(sigma / 2.0 / math.sqrt(passes))  # replace-one: sensitivity 2C
        return dp.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gaussian)
    gaussian = dp.GaussianDpEvent(sigma / math.sqrt(passes))  # add/remove: sensitivity C
    if clients_per_round == num_clients:
        return gaussian
    return dp.PoissonSampledDpEvent(clients_per_round / num_clients, gaussian)


def neighbouring_relation(accountant: str) -> Any:
    """The relation the accountant's bound holds for (see the module docstring)."""
    relation = _dp().NeighboringRelation
    return relation.REPLACE_ONE if accountant == "rdp" else relation.ADD_OR_REMOVE_ONE


def epsilon_after_rounds(sigma: float, num_clients: int, clients_per_round: int, rounds: int, passes: int,
                         delta: float, accountant: Accountant = "rdp",
                         at_rounds: Sequence[int] | None = None) -> list[float]:
    """Epsilon spent after each round in ``at_rounds`` (default: every round 1..rounds).

    Planning needs the whole curve, not only the end: an operator picks the round count where the
    budget still allows it. RDP adds up over rounds, so one round's RDP scaled gives every round;
    PLD is composed incrementally between the requested rounds.
    """
    _check(num_clients, clients_per_round, rounds, passes, delta, accountant)
    _check_sigma(sigma)
    wanted = sorted(set(range(1, rounds + 1) if at_rounds is None else at_rounds))
    if wanted and not 1 <= wanted[0] <= wanted[-1] <= rounds:
        raise PrivacyError(f"at_rounds must lie in 1..rounds ({rounds})")
    dp = _dp()
    event = round_event(sigma, num_clients, clients_per_round, passes, accountant)
    if accountant == "rdp":
        one = dp.rdp.RdpAccountant(neighboring_relation=neighbouring_relation(accountant))
        one.compose(event)
        return [float(dp.rdp.rdp_privacy_accountant.compute_epsilon(one.orders, r * one.rdp, delta)[0])
                for r in wanted]
    pld = dp.pld.PLDAccountant(neighboring_relation=neighbouring_relation(accountant),
                               value_discretization_interval=PLD_DISCRETIZATION)
    epsilons, done = [], 0
    for r in wanted:
        pld.compose(event, r - done)
        done = r
        epsilons.append(float(pld.get_epsilon(delta)))
    return epsilons


def epsilon_of_rounds(sigma: float, samples: Sequence[tuple[int, int]], passes: int, delta: float,
                      accountant: Accountant = "rdp") -> float:
    """Epsilon spent by rounds that each sampled ``selected`` of ``population`` clients: (population, selected) per round.

    A running server knows each round's sample only when it opens it (clients come and go), so
    its budget composes the rounds as they were, not as planned: ``epsilon_of_releases`` with
    ``passes`` mechanisms for every round.
    """
    return epsilon_of_releases(sigma, [(population, selected, passes) for population, selected in samples], delta,
                               accountant)


def epsilon_of_releases(sigma: float, releases: Sequence[tuple[int, int, int]], delta: float,
                        accountant: Accountant = "rdp") -> float:
    """Epsilon spent by releases, each (population, selected, mechanisms): ``mechanisms`` Gaussian
    releases of multiplier sigma on one sample of ``selected`` of ``population`` clients.

    A committed round is one entry with the run's passes; an abandoned secure attempt that sent
    its noisy first pass (Q = orth(Y + N1)) before it failed is one more entry of 1 mechanism on
    its own sample. RDP adds up over entries, and one sample's RDP (about half a second of
    dp-accounting's work) is computed once per process; PLD composes equal entries together (one
    event with a count).
    """
    if not releases:
        return 0.0
    _check_sigma(sigma)
    for population, selected, mechanisms in releases:
        _check(population, selected, 1, mechanisms, delta, accountant)
    dp = _dp()
    counts = sorted(Counter(releases).items())
    if accountant == "rdp":
        rdps = [(count, _round_rdp(sigma, *_lowest_terms(population, selected), mechanisms))
                for (population, selected, mechanisms), count in counts]
        total = sum(count * rdp for count, (_, rdp) in rdps)
        return float(dp.rdp.rdp_privacy_accountant.compute_epsilon(rdps[0][1][0], total, delta)[0])
    composed = dp.pld.PLDAccountant(neighboring_relation=neighbouring_relation(accountant),
                                    value_discretization_interval=PLD_DISCRETIZATION)
    for (population, selected, mechanisms), count in counts:
        composed.compose(round_event(sigma, population, selected, mechanisms, accountant), count)
    return float(composed.get_epsilon(delta))


def _lowest_terms(population: int, selected: int) -> tuple[int, int]:
    """The sample as the fraction selected / population in lowest terms: its RDP depends on that ratio alone."""
    common = math.gcd(population, selected)
    return population // common, selected // common


@functools.lru_cache(maxsize=4096)
def _round_rdp(sigma: float, population: int, selected: int, passes: int) -> tuple[Any, Any]:
    """(orders, RDP at each order) of one round, as dp-accounting's RDP accountant composes it."""
    one = _dp().rdp.RdpAccountant(neighboring_relation=neighbouring_relation("rdp"))
    one.compose(round_event(sigma, population, selected, passes, "rdp"))
    return one.orders, one.rdp


def sigma_for_epsilon(target_epsilon: float, num_clients: int, clients_per_round: int, rounds: int, passes: int,
                      delta: float, accountant: Accountant = "rdp", max_sigma: float = MAX_SIGMA) -> float:
    """The smallest noise multiplier (to 0.1%) whose run of ``rounds`` spends at most ``target_epsilon``.

    Brackets from sigma = 1 by doubling or halving, then bisects on log(sigma): epsilon falls as
    sigma grows. The answer is the upper end of the final bracket, so the epsilon it spends never
    exceeds the target. Searches [MIN_SEARCHED_SIGMA, max_sigma]; a target met at the floor
    returns the floor.
    """
    _check(num_clients, clients_per_round, rounds, passes, delta, accountant)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0.0):
        raise PrivacyError(f"target_epsilon {target_epsilon} must be a positive number")
    if not (math.isfinite(max_sigma) and MIN_SEARCHED_SIGMA < max_sigma <= MAX_SIGMA):
        raise PrivacyError(f"max_sigma {max_sigma} is outside ({MIN_SEARCHED_SIGMA}, {MAX_SIGMA}]")

    def meets(sigma: float) -> bool:
        return epsilon_after_rounds(sigma, num_clients, clients_per_round, rounds, passes, delta, accountant,
                                    at_rounds=[rounds])[0] <= target_epsilon

    if not meets(max_sigma):
        raise PrivacyError(f"target_epsilon {target_epsilon} is unreachable after {rounds} rounds with a noise "
                           f"multiplier up to {max_sigma}: use fewer rounds, fewer clients per round or a larger target")
    low, high = _bracket(meets, max_sigma)
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if meets(mid) else (mid, high)
    return high


def _bracket(meets: Callable[[float], bool], max_sigma: float) -> tuple[float, float]:
    """(low, high) with ``meets(high)`` true and ``meets(low)`` false, or (floor, floor) when the floor meets."""
    high = min(1.0, max_sigma)
    if meets(high):
        while high > MIN_SEARCHED_SIGMA:
            low = max(high / 2.0, MIN_SEARCHED_SIGMA)
            if not meets(low):
                return low, high
            high = low
        return high, high
    low = high
    while True:  # terminates: meets(max_sigma) holds
        high = min(low * 2.0, max_sigma)
        if meets(high):
            return low, high
        low = high
