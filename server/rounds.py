"""The round state machine: which round is open, who trains in it, and when it closes.

A plain object with no gRPC, no I/O and no clock of its own: every method that depends on time
takes ``now`` (Unix seconds), so tests drive it deterministically and a restarted server can
rebuild it from the database. It decides; the caller persists each decision it returns (the
events) before acting on it. The rules are those of protos/PROTOCOL.md, "Rounds":

- a round opens when at least ``min_clients`` clients are available (connected, or holding an
  accepted update for the round), and selects participants with a generator seeded by
  (run seed, round, attempt), always keeping clients whose update is already accepted;
- under differential privacy (``RoundPolicy.fresh_attempts``) every attempt is a uniform sample
  without replacement of the eligible clients, as the accountant assumes, drawn from the
  operating system's secret randomness rather than the run seed (amplification by sampling holds
  only when nobody can recompute who was sampled; the selection is persisted, so a restart needs
  no reproducible draw): an abandoned attempt
  drops its accepted updates instead of keeping them, and a round whose release would pass the
  privacy budget (``RoundMachine.gate``) does not open: the run ends (``Ended``);
- it closes when every selected client has submitted, or at its deadline when the quorum has
  (or as soon as every client still missing has left, rather than waiting for the deadline);
- otherwise the attempt is abandoned and a new attempt of the same round opens when enough
  clients are available again. Accepted updates stay valid: the base version has not moved.
- a round that waits with too few clients says so ("needs 3 connected clients, has 2"), once
  per change of either number, and an operator may change the policy while the run goes on.
- one payload counts once a round: the same bytes (sha256) from a second client are refused, and
  that client is not asked again this round (it would train the same bytes again: same seed,
  same data); the round closes without it, as without a client that left.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum

from flora.server.errors import AlreadyExists, FailedPrecondition

# Float noise must not turn 0.7 * 10 clients into a quorum of 8.
_EPSILON = 1e-9
REASON_COUNT_S = 1.0  # how old the count of available clients in a WAIT reason may be


class DuplicatePayload(AlreadyExists):
    """An update with the same bytes as another client's accepted one: refused, so that one payload
    never counts twice (two identities, one update), and recorded in the round's history."""

    def __init__(self, message: str, owner: str) -> None:
        super().__init__(message)
        self.owner = owner  # the client whose accepted update holds these bytes


@dataclass(frozen=True)
class Selection:
    """How many clients a round selects: all available, a fixed count, or a fraction."""

    mode: str  # "all" | "count" | "fraction"
    value: float = 0.0

    @classmethod
    def parse(cls, text: object) -> Selection:
        """Parse "all", a positive integer ("8") or a fraction in (0, 1] ("0.25")."""
        if not isinstance(text, str):
            raise ValueError(f"clients_per_round must be 'all', a count or a fraction, got {text!r}")
        text = text.strip().lower()
        if text == "all":
            return cls("all")
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"clients_per_round must be 'all', a count >= 1 or a fraction in (0, 1], got {text!r}") from None
        if text.isdigit() and number >= 1:
            return cls("count", number)
        if 0.0 < number <= 1.0:
            return cls("fraction", number)
        raise ValueError(f"clients_per_round must be 'all', a count >= 1 or a fraction in (0, 1], got {text!r}")

    def size(self, available: int) -> int:
        """Clients to select out of ``available`` (at least one when any is available)."""
        if self.mode == "all":
            return available
        if self.mode == "count":
            return min(available, int(self.value))
        return min(available, max(1, math.ceil(self.value * available - _EPSILON)))


@dataclass(frozen=True)
class RoundPolicy:
    """The run's fixed round rules (from the server settings)."""

    rounds: int
    min_clients: int
    selection: Selection
    quorum: float  # fraction of the selected clients, in (0, 1]
    deadline_s: float
    client_timeout_s: float
    seed: int
    fresh_attempts: bool = False  # DP: no attempt keeps an earlier attempt's updates (each is a uniform sample)

    def quorum_count(self, selected: int) -> int:
        """Accepted updates that close a round of ``selected`` clients at its deadline."""
        return max(1, math.ceil(self.quorum * selected - _EPSILON))


class RoundState(str, Enum):
    """Where one round stands; the values are those Status reports."""

    WAITING = "waiting"  # no attempt open yet: too few clients
    OPEN = "open"
    ABANDONED = "abandoned"  # the last attempt missed its quorum; the next opens with clients
    AGGREGATING = "aggregating"
    DONE = "done"


@dataclass
class Round:
    """The current round: its latest attempt and the updates accepted across its attempts."""

    number: int
    attempt: int = 0
    state: RoundState = RoundState.WAITING
    selected: frozenset[str] = frozenset()
    deadline: float = 0.0
    quorum: int = 0
    accepted: dict[str, str] = field(default_factory=dict)  # client id -> sha256 of its update
    declined: set[str] = field(default_factory=set)  # clients whose update copied an accepted one: not asked again
    population: int = 0  # clients the attempt's selection was drawn from (the privacy accountant's n)
    sampled: int = 0  # clients it selected then (its k; later withdrawals do not lower it)


@dataclass
class Presence:
    """What the machine knows of one client's liveness."""

    last_seen: float = -math.inf
    left: bool = False
    in_flight: int = 0  # calls being served now (a long-poll in progress is a sign of life)


# --- decisions returned to the caller -------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """A new attempt of a round opened with this selection, deadline and quorum."""

    round: Round


@dataclass(frozen=True)
class Abandoned:
    """The attempt missed its quorum at the deadline; accepted updates are kept."""

    number: int
    attempt: int
    accepted: int
    quorum: int
    reason: str = "missed its quorum at the deadline"
    dropped: tuple[str, ...] = ()  # fresh attempts: the clients whose accepted updates no longer count


@dataclass(frozen=True)
class Closed:
    """The round stops taking updates; aggregate these participants' updates."""

    number: int
    attempt: int
    participants: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Short:
    """Not a decision but a report: the round cannot open, it needs ``needed`` connected clients and has ``has``."""

    number: int
    needed: int
    has: int

    @property
    def text(self) -> str:
        return f"needs {self.needed} connected clients, has {self.has}"


@dataclass(frozen=True)
class Ended:
    """The round may not open (``RoundMachine.gate``: the privacy budget): the run ends at ``version``."""

    number: int
    version: int
    reason: str


Event = Opened | Abandoned | Closed | Ended


@dataclass(frozen=True)
class Train:
    """Task: train ``number`` from ``required_version`` and upload before ``deadline``."""

    number: int
    deadline: float
    required_version: int


@dataclass(frozen=True)
class Wait:
    """Task: nothing to do now, for this reason."""

    reason: str


@dataclass(frozen=True)
class Finished:
    """Task: the run is over at this version."""

    version: int


Task = Train | Wait | Finished


class RoundMachine:
    """The rounds of one run, from version ``version`` on."""

    def __init__(self, policy: RoundPolicy, version: int = 0, current: Round | None = None) -> None:
        self.policy = policy
        self.version = version
        self.current = current
        self.clients: dict[str, Presence] = {}
        self._counted: tuple[float, int] = (-math.inf, 0)  # (now, available) last told in a WAIT reason
        self._short: Short | None = None  # the shortfall last reported (reported again when it changes)
        # Asked before an attempt opens, with (round, population, selected): why it may not, or None.
        self.gate: Callable[[int, int, int], str | None] | None = None
        if current is None and not self.finished:
            self.current = Round(version + 1)

    # --- presence ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether every round of the run is done."""
        return self.version >= self.policy.rounds

    def joined(self, client: str, now: float) -> None:
        """A client joined (or rejoined): it is connected and may be selected again."""
        self.clients[client] = Presence(last_seen=now, in_flight=self.clients.get(client, Presence()).in_flight)

    def known(self, client: str, left: bool = False) -> None:
        """Register a client restored from storage; it counts as connected once it calls."""
        self.clients.setdefault(client, Presence(left=left))

    def seen(self, client: str, now: float) -> None:
        """Any call from the client is a sign of life."""
        self.clients.setdefault(client, Presence()).last_seen = now

    def call_started(self, client: str, now: float) -> None:
        """A call from the client is being served (it stays connected while the call lasts)."""
        self.seen(client, now)
        self.clients[client].in_flight += 1

    def call_ended(self, client: str, now: float) -> None:
        """The call counted by ``call_started`` is over."""
        presence = self.clients[client]
        presence.in_flight = max(0, presence.in_flight - 1)
        presence.last_seen = now

    def left(self, client: str) -> None:
        """The client withdrew: never selected again until it joins again."""
        self.clients.setdefault(client, Presence()).left = True

    def withdraw(self, client: str) -> bool:
        """Take ``client`` out of the open attempt that selected it before it changed its LoRA
        (rank, alpha, scaling rule): its change takes effect from the next attempt that selects
        it, never in an attempt opened before the change. An update it already had accepted stays.
        True when the attempt changed (the caller persists it; ``advance`` then closes the attempt
        if everyone left in it has submitted, or abandons it if nobody is left).
        """
        current = self.current
        if current is None or current.state is not RoundState.OPEN or client not in current.selected:
            return False
        if client in current.accepted:
            return False
        current.selected = current.selected - {client}
        return True

    def is_connected(self, client: str, now: float) -> bool:
        """Not left, and either in a call now or heard from within the client timeout."""
        presence = self.clients.get(client)
        if presence is None or presence.left:
            return False
        return presence.in_flight > 0 or now - presence.last_seen <= self.policy.client_timeout_s

    def connected(self, now: float) -> list[str]:
        """Every connected client, sorted."""
        return sorted(c for c in self.clients if self.is_connected(c, now))

    def _available(self, now: float) -> int:
        """Clients a new attempt can count on: connected, or holding an accepted update (O(clients))."""
        current = self.current
        return sum(1 for c in self.clients if c in current.accepted or self.is_connected(c, now)) + sum(
            1 for c in current.accepted if c not in self.clients)

    def available(self, now: float) -> int:
        """Clients an attempt of the current round could count on now (0 once the run is finished)."""
        return 0 if self.current is None else self._available(now)

    def _recent_available(self, now: float) -> int:
        """``_available``, counted at most once per REASON_COUNT_S: every long-poll of a filling run asks."""
        at, available = self._counted
        if not 0 <= now - at < REASON_COUNT_S:
            self._counted = (now, available := self._available(now))
        return available

    def set_policy(self, policy: RoundPolicy) -> None:
        """Change the round rules of a running run (an operator's call); the next ``advance`` applies them.

        ``rounds`` may not drop below the current round (its updates would belong to no round),
        and a finished run keeps its rules. Selection, quorum and deadline apply from the next
        attempt; min_clients and rounds at once.
        """
        if self.finished:
            raise FailedPrecondition(f"the run finished at version {self.version}: its settings no longer change anything")
        if policy.rounds < self.current.number:
            raise FailedPrecondition(f"rounds {policy.rounds} is below the current round {self.current.number}: "
                                     f"rounds must be at least {self.current.number}")
        self.policy = policy
        self._counted = (-math.inf, 0)

    def _may_open(self, now: float) -> bool:
        """Whether enough clients are available to open an attempt; O(1) while too few have ever joined."""
        if len(self.clients) + len(self.current.accepted) < self.policy.min_clients:
            return False  # every Join of a filling run asks: don't count them all each time
        return self._available(now) >= self.policy.min_clients

    # --- tasks ------------------------------------------------------------------------------

    def task_for(self, client: str, now: float) -> Task:
        """What ``client`` should do now."""
        if self.finished:
            return Finished(self.version)
        current = self.current
        presence = self.clients.get(client)
        if presence is not None and presence.left:
            return Wait("the client has left the run; join again to take part")
        if client in current.declined:
            return Wait(f"round {current.number}: this client's update repeated another client's accepted one; "
                        "waiting for the round to close")
        if current.state is RoundState.OPEN and client in current.selected and client not in current.accepted:
            if now < current.deadline:
                return Train(current.number, current.deadline, self.version)
        return Wait(self._wait_reason(client, now))

    def _wait_reason(self, client: str, now: float) -> str:
        current = self.current
        if client in current.accepted:
            return f"update for round {current.number} accepted; waiting for the round to close"
        if current.state is RoundState.OPEN:
            return f"round {current.number} is in progress without this client"
        if current.state is RoundState.AGGREGATING:
            return f"round {current.number} is being aggregated"
        short = Short(current.number, self.policy.min_clients, self._recent_available(now))
        return f"waiting for clients to open round {current.number}: {short.text}"

    # --- transitions ------------------------------------------------------------------------

    def advance(self, now: float) -> list[Event]:
        """Apply every transition due at ``now``: deadline closes or abandons, openings."""
        current = self.current
        if self.finished or current.state is RoundState.AGGREGATING:
            return []
        events: list[Event] = []
        if current.state is RoundState.OPEN:
            if self._all_submitted():
                return [self._close("every selected client has submitted")]  # e.g. restored after a crash
            pending = current.selected - current.accepted.keys() - current.declined
            # Waiting is pointless once every missing client has left: decide now, as at the deadline.
            everyone_left = all(self.clients.get(c, Presence()).left for c in pending)
            if everyone_left or now >= current.deadline:
                if len(current.accepted) >= current.quorum:
                    return [self._close("every selected client that stayed has submitted" if everyone_left
                                        else "deadline reached with quorum")]
                current.state = RoundState.ABANDONED
                dropped = tuple(sorted(current.accepted)) if self.policy.fresh_attempts else ()
                events.append(Abandoned(current.number, current.attempt, len(current.accepted), current.quorum,
                                        dropped=dropped))
                current.accepted = {} if dropped else current.accepted
        if current.state in (RoundState.WAITING, RoundState.ABANDONED):
            if self._may_open(now):
                events.append(opened := self._open(now))
                if isinstance(opened, Opened) and self._all_submitted():
                    events.append(self._close("every selected client has submitted"))
        return events

    def shortfall(self, now: float) -> Short | None:
        """Why the current round cannot open, when that is news: once per change of either number.

        A report, not a decision (nothing to persist): call it after ``advance``.
        """
        current = self.current
        if self.finished or current.state not in (RoundState.WAITING, RoundState.ABANDONED):
            self._short = None
            return None
        short = Short(current.number, self.policy.min_clients, self._recent_available(now))
        if short.has >= short.needed or short == self._short:
            return None
        self._short = short
        return short

    def _open(self, now: float) -> Opened | Ended:
        current = self.current
        kept = set(current.accepted)
        candidates = sorted(set(self.connected(now)) - kept - current.declined)
        wanted = self.policy.selection.size(len(candidates) + len(kept)) - len(kept)
        count = max(0, min(wanted, len(candidates)))
        refusal = None if self.gate is None else self.gate(current.number, len(candidates) + len(kept), len(kept) + count)
        if refusal is not None:
            return self._end(refusal)
        current.attempt += 1
        chosen = self._sampler(current.number, current.attempt).sample(candidates, count)
        current.selected = frozenset(kept | set(chosen))
        current.population, current.sampled = len(candidates) + len(kept), len(current.selected)
        current.deadline = now + self.policy.deadline_s
        current.quorum = self.policy.quorum_count(len(current.selected))
        current.state = RoundState.OPEN
        return Opened(Round(current.number, current.attempt, current.state, current.selected,
                            current.deadline, current.quorum, dict(current.accepted),
                            population=current.population, sampled=current.sampled))

    def _sampler(self, number: int, attempt: int) -> random.Random:
        """The seeded generator of this attempt's selection, or under DP a secret one."""
        if self.policy.fresh_attempts:
            return random.SystemRandom()
        return random.Random(f"flora-selection:{self.policy.seed}:{number}:{attempt}")

    def _end(self, reason: str) -> Ended:
        """Finish the run at the committed version: no round after it opens."""
        number = self.current.number
        self.policy = replace(self.policy, rounds=self.version)
        self.current = None
        return Ended(number, self.version, reason)

    def _close(self, reason: str) -> Closed:
        current = self.current
        current.state = RoundState.AGGREGATING
        return Closed(current.number, current.attempt, tuple(sorted(current.accepted)), reason)

    def check_submission(self, client: str, number: int, sha256: str, base_version: int, now: float) -> bool:
        """Whether an update may be recorded: True if new, False for an idempotent duplicate.

        Raises ``FailedPrecondition`` (wrong or closed round, not selected, past the deadline,
        stale base version), ``AlreadyExists`` (a different update is already accepted) or
        ``DuplicatePayload`` (another client's accepted update has the same sha256).
        """
        current = self.current
        if current is None or self.finished or number != current.number:
            open_now = "none" if self.finished else str(current.number)
            raise FailedPrecondition(f"round {number} is not open for updates (current round: {open_now})")
        prior = current.accepted.get(client)
        if prior == sha256:
            return False
        if prior is not None:
            raise AlreadyExists(
                f"round {number}: a different update (sha256 {prior[:12]}) is already accepted from this client"
            )
        if current.state is not RoundState.OPEN:
            raise FailedPrecondition(f"round {number} is not open for updates (state: {current.state.value})")
        if client not in current.selected:
            raise FailedPrecondition(f"round {number}: this client is not selected in attempt {current.attempt}")
        if now >= current.deadline:
            raise FailedPrecondition(f"round {number}: the deadline has passed")
        if base_version != self.version:
            raise FailedPrecondition(
                f"round {number}: update trained from version {base_version}, the round requires version {self.version}"
            )
        if sha256 in current.accepted.values():  # a scan in C: microseconds at 1,000 clients
            owner = next(c for c, digest in current.accepted.items() if digest == sha256)
            raise DuplicatePayload(
                f"round {number}: another client's accepted update has the same payload (sha256 {sha256[:12]}): "
                "the same bytes count once a round", owner)
        return True

    def accept(self, client: str, number: int, sha256: str, now: float) -> list[Event]:
        """Record an update that ``check_submission`` allowed and the caller has persisted."""
        current = self.current
        if number != current.number or current.state is not RoundState.OPEN:
            raise FailedPrecondition(f"round {number} is not open for updates")
        current.accepted[client] = sha256
        if self._all_submitted():
            return [self._close("every selected client has submitted")]
        return []

    def decline(self, client: str, number: int) -> list[Event]:
        """``client``'s update copied another's (``DuplicatePayload``): do not ask it again this round."""
        current = self.current
        if current is None or number != current.number or current.state is not RoundState.OPEN:
            return []
        current.declined.add(client)
        return [self._close("every selected client has submitted")] if self._all_submitted() else []

    def _all_submitted(self) -> bool:
        """Every selected client has an accepted (or a declined) update; O(1) until the counts say it may be so.

        Each accepted upload asks this: a subset test each time would cost O(clients^2) a round.
        """
        current = self.current
        if len(current.accepted) + len(current.declined) < len(current.selected) or not current.accepted:
            return False
        return current.selected <= current.accepted.keys() | current.declined

    def exclude(self, number: int, clients: Iterable[str]) -> bool:
        """Take updates that broke the round's aggregation out of it (already persisted).

        Returns True when some remain, to aggregate without the excluded ones; False when none
        does, and the round is abandoned: a new attempt opens once enough clients are available.
        """
        current = self.current
        if current is None or current.number != number or current.state is not RoundState.AGGREGATING:
            raise RuntimeError(f"round {number} is not being aggregated")
        for client in clients:
            current.accepted.pop(client, None)
        if current.accepted:
            return True
        current.state = RoundState.ABANDONED
        return False

    def aggregated(self, number: int) -> None:
        """The round's aggregate is committed: its version is the latest, the next round waits."""
        if self.current is None or self.current.number != number or self.current.state is not RoundState.AGGREGATING:
            raise RuntimeError(f"round {number} is not being aggregated")
        self.version = number
        self.current = None if self.finished else Round(number + 1)

    def restore_accepted(self, accepted: Iterable[tuple[str, str]]) -> None:
        """Put back the current round's accepted updates after a restart."""
        self.current.accepted.update(accepted)
