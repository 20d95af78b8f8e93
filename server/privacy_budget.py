"""The privacy budget of a running DP run: what its releases spent, and whether the next round may open.

Client-level DP (issue 31; README, "Differential privacy") states one (epsilon, delta) for the
run's releases. The epsilon is composed over the rounds actually committed, each with the
sample it really drew (``selected`` of ``population`` eligible clients, uniformly without
replacement: ``flora.server.rounds``), by ``flora.common.privacy.accountant``, and over every
noisy pass that left the server outside a committed round (the Q of a secure attempt that then
failed: ``flora.server.dp_releases``), each one mechanism on its own attempt's sample. Both are
read from disk, never from a counter kept in memory, so a server killed and restarted neither
forgets a release nor counts one twice; the history line of each round carries what had been
spent once it committed (``dp_epsilon``, ``dp_delta``: its own passes, every earlier round's and
every release recorded before it) and the sample that it was accounted with.

Before a round opens, ``refusal`` composes that round's sample too: when the epsilon would pass
``dp_target_epsilon`` the round does not open and the run ends at the version before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flora.common.privacy.accountant import epsilon_of_releases
from flora.server.config import ServerSettings
from flora.server.dp_releases import PASS_ONE_MECHANISMS, Release, outside_commits
from flora.v1 import coordinator_pb2 as pb

# History fields of a DP round: the spent budget after it, and the sample it was accounted with.
EPSILON, DELTA, POPULATION, SELECTED = "dp_epsilon", "dp_delta", "dp_population", "dp_selected"


@dataclass
class PrivacyBudget:
    """The run's accountant: the committed samples, the releases outside them, and what one more round would spend."""

    sigma: float
    passes: int
    delta: float
    accountant: str
    target: float | None
    samples: list[tuple[int, int]] = field(default_factory=list)  # (population, selected) per committed round
    released: list[Release] = field(default_factory=list)  # passes sent outside a commit (attempts not committed)
    spent: float = 0.0  # epsilon after the committed rounds and the released passes

    @classmethod
    def of_run(cls, settings: ServerSettings, history: Sequence[dict[str, Any]],
               releases: Sequence[Release] = ()) -> PrivacyBudget | None:
        """The budget of a DP run from its committed history and its recorded releases (None without DP).

        A release whose attempt committed is one of that round's passes, not counted again. The
        delta is the run's first round's, as its history line says: the default follows
        min_clients, which an operator may change while the run goes on; the run's delta may not.
        """
        if not settings.dp_enabled:
            return None
        rounds = [r for r in history if r.get("round", 0) > 0 and POPULATION in r]
        delta = rounds[0][DELTA] if rounds else releases[0].dp_delta if releases else settings.dp_effective_delta
        budget = cls(settings.dp_noise_multiplier, settings.dp_mechanisms_per_round, delta, settings.dp_accountant,
                     settings.dp_target_epsilon, [(r[POPULATION], r[SELECTED]) for r in rounds],
                     outside_commits(releases, rounds))
        budget.spent = budget.epsilon_after(budget.samples)
        return budget

    def epsilon_after(self, samples: Sequence[tuple[int, int]]) -> float:
        """Epsilon after rounds with these samples and the released passes (pure: nothing is recorded)."""
        return self._epsilon(samples, self.released)

    def _epsilon(self, samples: Sequence[tuple[int, int]], released: Sequence[Release]) -> float:
        events = [(population, selected, self.passes) for population, selected in samples]
        events += [(r.population, r.selected, r.mechanisms) for r in released]
        return epsilon_of_releases(self.sigma, events, self.delta, self.accountant)

    def refusal(self, number: int, population: int, selected: int) -> str | None:
        """Why round ``number``, sampling ``selected`` of ``population``, may not open; None when it may."""
        if self.target is None or selected == 0:  # nothing selected: nothing released
            return None
        epsilon = self.epsilon_after([*self.samples, (population, selected)])
        if epsilon <= self.target:
            return None
        return (f"privacy budget: round {number} would spend epsilon {epsilon:.4g} > target {self.target:g} "
                f"(delta {self.delta:.3g}, {selected} of {population} clients); the run ends at version {number - 1}")

    def last_round_within(self, population: int, selected: int, rounds: int) -> int:
        """The last round up to ``rounds`` that stays within the target if every round left samples
        ``selected`` of ``population`` (a plan, said at start; bisected: epsilon grows with rounds)."""
        done = len(self.samples)

        def within(last: int) -> bool:
            return self.epsilon_after([*self.samples, *[(population, selected)] * (last - done)]) <= self.target

        if self.target is None or within(rounds):
            return rounds
        low, high = done, rounds  # round ``low`` is committed or stays within, ``high`` passes
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if within(mid) else (low, mid)
        return low

    def release_of(self, number: int, attempt: int, population: int, selected: int, now: float) -> Release:
        """The record of attempt ``attempt``'s noisy first pass, about to be sent before its round
        commits, with the epsilon spent once it is (pure: ``add_release`` counts it)."""
        entry = Release(round=number, attempt=attempt, population=population, selected=selected,
                        mechanisms=PASS_ONE_MECHANISMS, dp_epsilon=0.0, dp_delta=self.delta, released_unix=now)
        others = [r for r in self.released if r.key != entry.key]
        return entry.model_copy(update={EPSILON: self._epsilon(self.samples, [*others, entry])})

    def add_release(self, entry: Release) -> None:
        """A recorded release now counts as spent (once per attempt)."""
        if all(r.key != entry.key for r in self.released):
            self.released.append(entry)
            self.spent = max(self.spent, entry.dp_epsilon)

    def record(self, number: int, attempt: int, population: int, selected: int) -> dict[str, Any]:
        """The history fields of round ``number`` about to be committed by ``attempt`` with this sample
        (that attempt's own release, if any, is one of the round's passes)."""
        others = [r for r in self.released if r.key != (number, attempt)]
        epsilon = self._epsilon([*self.samples, (population, selected)], others)
        return {EPSILON: epsilon, DELTA: self.delta, POPULATION: population, SELECTED: selected}

    def committed(self, record: dict[str, Any]) -> None:
        """The round whose ``record`` (its history line) was just committed now counts as spent."""
        self.samples.append((record[POPULATION], record[SELECTED]))
        self.released = [r for r in self.released if r.key != (record["round"], record["attempts"])]
        self.spent = record[EPSILON]


def ended_before(budget: PrivacyBudget | None, finished: bool, version: int, live_rounds: str | None) -> str:
    """After a restart: the line saying that the budget had ended the run, or "".

    The end is stored as the run's rounds set to its last version, which no operator can set
    (``RoundMachine.set_policy`` keeps rounds above the committed version), so it is recognised.
    """
    if budget is None or budget.target is None or not finished or live_rounds != str(version):
        return ""
    return (f"privacy budget: round {version + 1} would have passed target {budget.target:g} "
            f"(epsilon {budget.spent:.4g} spent); the run ended at version {version}")


def privacy_status(budget: PrivacyBudget, clip_norm: float, ended: str) -> pb.PrivacyStatus:
    """The budget as Status reports it."""
    return pb.PrivacyStatus(epsilon=budget.spent, delta=budget.delta, target_epsilon=budget.target or 0.0,
                            noise_multiplier=budget.sigma, clip_norm=clip_norm, accountant=budget.accountant,
                            mechanisms_per_round=budget.passes, ended=ended)
