"""Driving the rounds: persist each decision of the state machine, aggregate off the event loop,
commit the new version, and wake the clients waiting on NextTask.

``RoundMachine`` decides; ``RoundDriver`` makes each decision durable before anything acts on
it, in the order a crash can be recovered from: an opened, abandoned or closed attempt is
written first; a round's outputs are written as files, then committed in one transaction
(``Store.commit_version``); then the history file is rewritten and the old merged file removed,
and only then do clients see the new version. A restart finds either the round still
"aggregating" (and aggregates it again from its recorded updates) or committed as done (and
never touches it again).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flora.server.aggregator import Aggregator, RoundOutput
from flora.server.config import ServerSettings
from flora.server.export import write_history
from flora.server.errors import is_resource_failure
from flora.server.layout import Layout
from flora.server.dp_releases import Release, read_releases, record_release
from flora.server.privacy_budget import PrivacyBudget, ended_before
from flora.server.secure_round import SecureRounds
from flora.server.rounds import Abandoned, Closed, Ended, Event, Opened, RoundMachine, RoundState
from flora.server.store import Store, Submission
from flora.server.wakeups import Signal

log = logging.getLogger(__name__)

T = TypeVar("T")
TICK_S = 0.25  # how often deadlines and client timeouts are looked at
_RETRY_MAX_S = 60.0


def error_phrase(error: float, private: bool, secure: bool) -> str:
    """The round log line's words on its aggregation error: never "nan". Under DP and under secure
    aggregation the server measures none (it holds no clear update to measure against), and says why."""
    if not math.isnan(error):
        return f"aggregation error {error:.3g}"
    why = "private release" if private else "secure aggregation" if secure else "not measured"
    return f"aggregation error n/a ({why})"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _weighted_mean(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if pairs and total > 0 else None


class RoundDriver:
    """Applies the round machine's decisions and runs each round's aggregation."""

    def __init__(
        self, settings: ServerSettings, layout: Layout, store: Store, aggregator: Aggregator, machine: RoundMachine
    ) -> None:
        self.settings = settings
        self.layout = layout
        self.store = store
        self.aggregator = aggregator
        self.machine = machine
        self.secure: SecureRounds | None = None  # set when the run uses secure aggregation
        # FetchGlobal bytes sent since the last commit, for the history (persisted per download: a restart keeps them).
        self.bytes_out = store.bytes_out(machine.current.number) if machine.current is not None else 0
        self.finished_at: float | None = time.time() if machine.finished else None
        self._changed = Signal()
        self._ticker: asyncio.Task | None = None
        self._aggregation: asyncio.Task | None = None
        self._retrying = False
        self._retry_delay = 0.0  # the last resource-failure backoff of this round (0: none yet)
        self._failures = 0  # consecutive failed ticks (for the ticker's backoff)
        self._reasons: dict[int, str] = {}
        # Under DP: the spent budget, from the committed history and the recorded releases (a restart
        # neither forgets nor repeats a round or a release).
        self.privacy = PrivacyBudget.of_run(settings, store.history(),
                                            read_releases(layout.dp_releases) if settings.dp_enabled else ())
        machine.gate = None if self.privacy is None else self.privacy.refusal
        self.ended = ended_before(self.privacy, machine.finished, machine.version, store.live_settings().get("rounds"))
        if (budget := self.privacy) is not None:
            log.info("differential privacy: noise multiplier %g, clip norm %g, %d Gaussian release(s) per round, %s "
                     "accountant, delta %.3g, target epsilon %s; epsilon %.4g spent by %d committed rounds and %d "
                     "released pass(es) of attempts that did not commit", budget.sigma, settings.dp_clip_norm,
                     budget.passes, budget.accountant, budget.delta, "none" if budget.target is None else
                     f"{budget.target:g}", budget.spent, len(budget.samples), len(budget.released))
            self._plan(budget)

    def use_secure_aggregation(self, run_id: str) -> None:
        """Run the rounds under secure aggregation, its released first passes recorded (``released``);
        before serving, take up the attempt a restart interrupted."""
        self.secure = SecureRounds(self.settings, self.aggregator, run_id, self.notify, released=self.released)
        self.secure.resume(self.machine.current)

    async def released(self, number: int, attempt: int) -> None:
        """Write-ahead, before a secure attempt sends its clients Q = orth(Y + N1): record that noisy
        pass durably and count it (server/dp_releases.py). Q stays with the server until then: a
        full disk is waited out here (the attempt goes on once there is space, instead of failing
        and making every client train again); any other failure raises, and the attempt fails
        without sending Q."""
        current, budget = self.machine.current, self.privacy
        if budget is None or current is None or (current.number, current.attempt) != (number, attempt):
            raise RuntimeError(f"round {number} attempt {attempt}: a noisy pass to release outside the current "
                               "attempt, or without a privacy budget")

        def record() -> Release:  # blocking: the accountant (a sample's RDP is ~0.5 s the first time), an fsync
            entry = budget.release_of(number, attempt, current.population, current.sampled, time.time())
            return record_release(self.layout.dp_releases, entry)

        budget.add_release(await self._patiently(number, "recording its released first pass", record))
        log.info("round %d attempt %d: its noisy first pass (Q) goes to the clients; recorded as released: epsilon "
                 "%.4g spent (it stays spent if this attempt does not commit)", number, attempt, budget.spent)

    def _plan(self, budget: PrivacyBudget) -> None:
        """Say at start when the target will end the run early, at the clients a round is sure of (min_clients)."""
        if self.machine.finished or budget.target is None:
            return
        population = self.settings.min_clients
        selected = self.settings.selection.size(population)
        last = budget.last_round_within(population, selected, self.settings.rounds)
        if last < self.settings.rounds:
            log.warning("privacy plan: with %d of %d clients per round, target epsilon %g allows rounds up to %d of %d; "
                        "the run ends there unless more eligible clients widen the sampling (flora-admin dp-plan)",
                        selected, population, budget.target, last, self.settings.rounds)

    # --- notifications --------------------------------------------------------------------

    @property
    def changed(self) -> Signal:
        """A signal set at the next state change (a fresh one after each change)."""
        return self._changed

    def notify(self) -> None:
        """Wake everyone waiting for a state change (in batches: see server/wakeups.py)."""
        event, self._changed = self._changed, Signal()
        event.set()

    # --- decisions ------------------------------------------------------------------------

    def advance(self) -> None:
        """Apply every transition due now (deadlines, openings); never raises.

        A decision that cannot be persisted (a full disk, say) is logged and memory is put back
        to what the database holds, so the two never disagree; the next tick tries again.
        """
        now = time.time()
        self.apply(self.machine.advance(now))
        if (short := self.machine.shortfall(now)) is not None:
            log.warning("round %d waiting: %s (flora-admin settings --set min_clients=N changes the need)",
                        short.number, short.text)

    def apply(self, events: Sequence[Event]) -> None:
        """Persist the machine's decisions, start aggregations, wake waiters; never raises."""
        try:
            for event in events:
                self._persist(event)
            self._failures = 0
        except Exception as error:  # noqa: BLE001 - the ticker and every handler call this
            self._resync(error)
        finally:
            if events:
                self.notify()

    def _persist(self, event: Event) -> None:
        if isinstance(event, Opened):
            self.store.save_attempt(event.round)
            log.info("round %d attempt %d opened: %d selected (%s), quorum %d, deadline in %.0fs",
                     event.round.number, event.round.attempt, len(event.round.selected),
                     ",".join(sorted(event.round.selected)), event.round.quorum, self.settings.round_deadline_s)
        elif isinstance(event, Abandoned):
            self._abandon(event)
            log.warning("round %d attempt %d abandoned: %s (%d of quorum %d accepted)",
                        event.number, event.attempt, event.reason, event.accepted, event.quorum)
        elif isinstance(event, Closed):
            self.store.set_attempt_state(event.number, event.attempt, RoundState.AGGREGATING)
            self._reasons[event.number] = event.reason
            log.info("round %d closed (%s): aggregating %d updates", event.number, event.reason, len(event.participants))
            self._start_aggregation(event.number, event.attempt)
        elif isinstance(event, Ended):
            self._end(event)

    def _abandon(self, event: Abandoned) -> None:
        """Mark the attempt abandoned; under DP its accepted updates go with it (the next attempt samples afresh)."""
        if not event.dropped:
            self.store.set_attempt_state(event.number, event.attempt, RoundState.ABANDONED)
            return
        why = "its attempt was abandoned; under differential privacy each attempt is a new uniform sample"
        removed = self.store.exclude_submissions(event.number, event.attempt, dict.fromkeys(event.dropped, why), True,
                                                 time.time(), blameless=True)
        for submission in removed:
            self.layout.absolute(submission.path).unlink(missing_ok=True)

    def _end(self, event: Ended) -> None:
        """The privacy budget ends the run: said once, and kept as the run's rounds (a restart stays finished)."""
        log.warning("%s", event.reason)
        self.ended = event.reason
        if event.version > 0:  # with nothing committed the end is not kept: a restart asks the budget again
            self.store.save_live_settings({"rounds": str(event.version)}, time.time())
        self.finished_at = time.time()
        log.info("run finished at version %d", event.version)

    def _resync(self, error: Exception) -> None:
        """After a failed write: log it, and reload the current round from the database."""
        self._failures += 1
        current = self.machine.current
        log.error("round %s: a state change could not be saved (%s: %s); kept the stored state, retrying "
                  "(failure %d in a row)", current.number if current else "-", type(error).__name__, error, self._failures)
        if current is not None and (self._aggregation is None or self._aggregation.done()):
            try:
                self.machine.current = self.store.load_round(current.number)
            except Exception:  # noqa: BLE001 - reading failed too: keep memory, the next tick retries
                log.exception("round %d: reloading the stored round failed", current.number)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the deadline ticker and resume an aggregation interrupted by a crash."""
        current = self.machine.current
        if current is not None and current.state is RoundState.AGGREGATING:
            log.info("round %d was closed before the restart: aggregating it again", current.number)
            self._reasons.setdefault(current.number, "closed before a restart")
            self._start_aggregation(current.number, current.attempt)
        self._ticker = asyncio.create_task(self._tick(), name="round-ticker")

    async def stop(self) -> None:
        """Stop ticking; let a running aggregation finish and commit (a thread cannot be cut short)."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        task = self._aggregation
        if task is not None and not task.done():
            if self._retrying:
                task.cancel()  # between failed attempts: the next start aggregates the round again
            else:
                log.info("waiting for the aggregation in progress to commit before exiting")
            await asyncio.gather(task, return_exceptions=True)
        self.notify()

    async def _tick(self) -> None:
        """Look at deadlines every TICK_S; after failed writes, back off (logged by ``advance``)."""
        while True:
            self.advance()
            await asyncio.sleep(TICK_S * 2 ** min(self._failures, 4))  # at most 4 s late once writes work again

    # --- aggregation ----------------------------------------------------------------------

    def _start_aggregation(self, number: int, attempt: int) -> None:
        self._aggregation = asyncio.create_task(self._aggregate(number, attempt), name=f"aggregate-round-{number}")

    async def _aggregate(self, number: int, attempt: int) -> None:
        """Aggregate the round and commit it; a failure never loops (protos/PROTOCOL.md, "Rounds").

        Running out of disk or descriptors is waited out with backoff. Any other failure is
        blamed on the updates that fail on their own, which are excluded (recorded, their files
        deleted) before the rest is aggregated; if none is to blame, all are, and the round is
        abandoned and reopens. Each pass removes an update or ends, so this terminates.
        """
        while True:
            submissions = None
            try:
                submissions = await asyncio.to_thread(self.store.submissions, number)
                if self.secure is not None:  # the clients' masked stages; no update is on disk
                    output = await self.secure.aggregate(number, submissions)
                else:
                    output = await asyncio.to_thread(self.aggregator.aggregate, number, submissions)
                break
            except Exception as error:  # noqa: BLE001 - every failure is either waited out or excluded
                if is_resource_failure(error):
                    await self._wait_to_retry(number, "aggregating", error)
                elif submissions is None:
                    log.exception("round %d: reading its updates failed; restart the server to aggregate it", number)
                    return
                elif not await self._exclude_faulty(number, attempt, submissions, error):
                    return
        now = time.time()
        closed, bytes_out = self._reasons.pop(number, ""), self.bytes_out
        try:  # in a thread: a record of every client and a durable commit are blocking work
            record = await self._patiently(number, "committing", lambda: self._commit(
                number, attempt, submissions, output, now, (closed, bytes_out)))
        except Exception:  # noqa: BLE001
            log.exception("round %d: committing the aggregate failed; restart the server to aggregate it again", number)
            return
        if self.privacy is not None:
            self.privacy.committed(record)
        # Derived files before anyone can see the new version: its history line is then on disk.
        # Nothing moves meanwhile: the machine still holds the round as aggregating.
        try:
            await asyncio.to_thread(self._after_commit, number)
        except OSError:
            log.exception("round %d: writing history.jsonl failed; it is rewritten at the next commit or start", number)
        self._advance_to(number, len(submissions), output, now)

    async def _patiently(self, number: int, what: str, blocking: Callable[[], T]) -> T:
        """``blocking()`` in a thread, its resource failures (a full disk) waited out; others raise."""
        while True:
            try:
                return await asyncio.to_thread(blocking)
            except Exception as error:  # noqa: BLE001
                if not is_resource_failure(error):
                    raise
                await self._wait_to_retry(number, what, error)

    async def _wait_to_retry(self, number: int, what: str, error: Exception) -> None:
        """Sleep out a resource failure with backoff (1 s doubling to 60 s), each one logged."""
        self._retry_delay = min(2 * self._retry_delay, _RETRY_MAX_S) if self._retry_delay else 1.0
        log.error("round %d: %s failed (%s: %s); retrying in %.0fs", number, what, type(error).__name__, error,
                  self._retry_delay)
        self._retrying = True
        try:
            await asyncio.sleep(self._retry_delay)
        finally:
            self._retrying = False

    async def _exclude_faulty(
        self, number: int, attempt: int, submissions: Sequence[Submission], error: Exception
    ) -> bool:
        """Take the updates at fault out of the round; False when none is left (round abandoned)."""
        log.error("round %d: aggregation failed (%s: %s); checking each update alone", number, type(error).__name__, error)
        try:
            # Under secure aggregation no update can be looked at alone: the attempt fails as a whole.
            reasons = {} if self.secure is not None else await asyncio.to_thread(self.aggregator.faulty, submissions)
            blameless = not reasons  # then the same update is taken again in the next attempt
            if blameless:
                detail = (f"the round failed to aggregate ({type(error).__name__}: {str(error)[:200]}) "
                          "and no single update is at fault")
                reasons = {s.client_id: detail for s in submissions}
            abandon = len(reasons) >= len(submissions)
            removed = self.store.exclude_submissions(number, attempt, reasons, abandon, time.time(), blameless)
        except Exception as failure:  # noqa: BLE001
            if not is_resource_failure(failure):
                raise
            await self._wait_to_retry(number, "excluding updates", failure)
            return True  # nothing changed: the next pass finds the same updates at fault
        for submission in removed:
            self.layout.absolute(submission.path).unlink(missing_ok=True)
            log.warning("round %d: the update of client %s is excluded: %s", number, submission.client_id,
                        reasons[submission.client_id])
        if self.machine.exclude(number, reasons):
            return True
        log.warning("round %d attempt %d abandoned: every update was excluded; the round reopens", number, attempt)
        self.notify()
        self.advance()
        return False

    def _advance_to(self, number: int, clients: int, output: RoundOutput, now: float) -> None:
        """The committed round's version becomes the one clients see; the next round may open."""
        self._retry_delay = 0.0
        self.machine.aggregated(number)
        self.bytes_out = 0
        log.info("round %d committed: version %d, %d clients, global rank %d, %s%s",
                 number, number, clients, output.global_rank,
                 error_phrase(output.aggregation_error, self.privacy is not None, self.secure is not None),
                 "" if output.validation_loss is None else f", validation loss {output.validation_loss:.4f}")
        if self.machine.finished:
            self.finished_at = now
            log.info("run finished at version %d", number)
        self.advance()
        self.notify()

    def _after_commit(self, number: int) -> None:
        """Derived files: the history; and merged weights of older versions go (no longer recorded)."""
        write_history(self.layout.history, self.store.history())
        for path in self.layout.merged(number).parent.glob("v*.safetensors"):
            if path != self.layout.merged(number):
                path.unlink(missing_ok=True)  # a download already reading one keeps its open file

    def _commit(self, number: int, attempt: int, submissions: Sequence[Submission], output: RoundOutput, now: float,
                context: tuple[str, int]) -> dict[str, Any]:
        """Build the round's history record and commit the round with it (blocking: run it in a thread)."""
        record = self._record(number, attempt, submissions, output, now, context)
        if self.privacy is not None:  # the machine still holds the round, with the sample it was accounted with
            current = self.machine.current
            record.update(self.privacy.record(number, attempt, current.population, current.sampled))
        self.store.commit_version(number, attempt, output.artifacts, record, now)
        return record

    def _record(
        self, number: int, attempt: int, submissions: Sequence[Submission], output: RoundOutput, now: float,
        context: tuple[str, int],
    ) -> dict[str, Any]:
        """The round's line in history.jsonl; ``context`` is (why the round closed, bytes served)."""
        closed, bytes_out = context
        names = {c.id: c.name for c in self.store.clients()}
        clients = [
            {"client_id": s.client_id, "name": names.get(s.client_id, ""), "rank": s.rank, "alpha": s.alpha,
             "num_examples": s.num_examples, "weight": w, "train_loss": s.train_loss, "validation_loss": s.validation_loss,
             "steps": s.steps, "train_seconds": s.train_seconds, "bytes": s.size,
             "norm": _finite(d.norm), "claimed_weight": d.raw_weight, "weight_capped": d.capped,
             "clip_factor": _finite(d.clip_factor),  # null under DP: functions of one client's clear update
             "rejected": d.rejected}
            for s, w, d in zip(submissions, output.weights, output.decisions)
        ]
        excluded = [{"client_id": c, "name": names.get(c, ""), "sha256": sha, "reason": why}
                    for c, sha, why in self.store.exclusions(number)]
        return {
            "round": number,
            "version": number,
            "attempts": attempt,
            "closed": closed,
            "clients": clients,
            "num_clients": len(clients),
            "excluded": excluded,
            "examples": sum(s.num_examples for s in submissions),
            "train_loss": _weighted_mean([s.train_loss for s in submissions], output.weights),
            "client_validation_loss": _weighted_mean([s.validation_loss for s in submissions], output.weights),
            "validation_loss": _finite(output.validation_loss),
            "aggregation_error": _finite(output.aggregation_error),
            "global_rank": output.global_rank,
            "downlink": output.downlink,
            "bytes_in": sum(s.size for s in submissions),
            "bytes_out": bytes_out,
            "committed_unix": now,
            "seconds": {k: round(v, 4) for k, v in output.seconds.items()},
            "checkpoint": output.checkpoint,
            "secure_aggregation": output.secure is not None,
            **({"secure": output.secure} if output.secure is not None else {}),
        }
