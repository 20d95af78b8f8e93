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
from collections.abc import Sequence
from typing import Any

from flora.server.aggregator import Aggregator, RoundOutput
from flora.server.config import ServerSettings
from flora.server.export import write_history
from flora.server.layout import Layout
from flora.server.rounds import Abandoned, Closed, Event, Opened, RoundMachine, RoundState
from flora.server.store import Store, Submission

log = logging.getLogger(__name__)

TICK_S = 0.25  # how often deadlines and client timeouts are looked at
_RETRY_MAX_S = 60.0


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
        self.bytes_out = 0  # FetchGlobal bytes sent since the last commit, for the history
        self.finished_at: float | None = time.time() if machine.finished else None
        self._changed = asyncio.Event()
        self._ticker: asyncio.Task | None = None
        self._aggregation: asyncio.Task | None = None
        self._retrying = False
        self._reasons: dict[int, str] = {}

    # --- notifications --------------------------------------------------------------------

    @property
    def changed(self) -> asyncio.Event:
        """An event set at the next state change (a fresh one after each change)."""
        return self._changed

    def notify(self) -> None:
        """Wake everyone waiting for a state change."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # --- decisions ------------------------------------------------------------------------

    def advance(self) -> None:
        """Apply every transition due now (deadlines, openings)."""
        self.apply(self.machine.advance(time.time()))

    def apply(self, events: Sequence[Event]) -> None:
        """Persist the machine's decisions, start aggregations, wake waiters."""
        for event in events:
            if isinstance(event, Opened):
                self.store.save_attempt(event.round)
                log.info("round %d attempt %d opened: %d selected (%s), quorum %d, deadline in %.0fs",
                         event.round.number, event.round.attempt, len(event.round.selected),
                         ",".join(sorted(event.round.selected)), event.round.quorum, self.settings.round_deadline_s)
            elif isinstance(event, Abandoned):
                self.store.set_attempt_state(event.number, event.attempt, RoundState.ABANDONED)
                log.warning("round %d attempt %d abandoned at its deadline: %d of quorum %d accepted",
                            event.number, event.attempt, event.accepted, event.quorum)
            elif isinstance(event, Closed):
                self.store.set_attempt_state(event.number, event.attempt, RoundState.AGGREGATING)
                self._reasons[event.number] = event.reason
                log.info("round %d closed (%s): aggregating %d updates", event.number, event.reason, len(event.participants))
                self._start_aggregation(event.number, event.attempt)
        if events:
            self.notify()

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
        while True:
            self.advance()
            await asyncio.sleep(TICK_S)

    # --- aggregation ----------------------------------------------------------------------

    def _start_aggregation(self, number: int, attempt: int) -> None:
        self._aggregation = asyncio.create_task(self._aggregate(number, attempt), name=f"aggregate-round-{number}")

    async def _aggregate(self, number: int, attempt: int) -> None:
        submissions = self.store.submissions(number)
        output = await self._aggregate_with_retries(number, submissions)
        now = time.time()
        try:
            record = self._record(number, attempt, submissions, output, now)
            self.store.commit_version(number, attempt, output.artifacts, record, now)
        except Exception:
            log.exception("round %d: committing the aggregate failed; restart the server to aggregate it again", number)
            return
        # Derived files before anyone can see the new version: its history line is then on disk.
        # Nothing moves meanwhile: the machine still holds the round as aggregating.
        try:
            await asyncio.to_thread(self._after_commit, number)
        except OSError:
            log.exception("round %d: writing history.jsonl failed; it is rewritten at the next commit or start", number)
        self._advance_to(number, len(submissions), output, now)

    async def _aggregate_with_retries(self, number: int, submissions: Sequence[Submission]) -> RoundOutput:
        """Aggregate in a worker thread; a failure (a full disk, say) is retried with backoff."""
        delay = 1.0
        while True:
            try:
                return await asyncio.to_thread(self.aggregator.aggregate, number, submissions)
            except Exception:
                log.exception("round %d: aggregation failed; retrying in %.0fs", number, delay)
            self._retrying = True
            try:
                await asyncio.sleep(delay)
            finally:
                self._retrying = False
            delay = min(2 * delay, _RETRY_MAX_S)

    def _advance_to(self, number: int, clients: int, output: RoundOutput, now: float) -> None:
        """The committed round's version becomes the one clients see; the next round may open."""
        self.machine.aggregated(number)
        self.bytes_out = 0
        log.info("round %d committed: version %d, %d clients, global rank %d, aggregation error %.3g%s",
                 number, number, clients, output.global_rank, output.aggregation_error,
                 "" if output.validation_loss is None else f", validation loss {output.validation_loss:.4f}")
        if self.machine.finished:
            self.finished_at = now
            log.info("run finished at version %d", number)
        self.advance()
        self.notify()

    def _after_commit(self, number: int) -> None:
        """Derived files: the history, and merged weights two versions old (no longer served)."""
        write_history(self.layout.history, self.store.history())
        if number >= 2:
            self.layout.merged(number - 2).unlink(missing_ok=True)

    def _record(
        self, number: int, attempt: int, submissions: Sequence[Submission], output: RoundOutput, now: float
    ) -> dict[str, Any]:
        """The round's line in history.jsonl."""
        names = {c.id: c.name for c in self.store.clients()}
        clients = [
            {"client_id": s.client_id, "name": names.get(s.client_id, ""), "rank": s.rank, "alpha": s.alpha,
             "num_examples": s.num_examples, "weight": w, "train_loss": s.train_loss, "validation_loss": s.validation_loss,
             "steps": s.steps, "train_seconds": s.train_seconds, "bytes": s.size}
            for s, w in zip(submissions, output.weights)
        ]
        return {
            "round": number,
            "version": number,
            "attempts": attempt,
            "closed": self._reasons.pop(number, ""),
            "clients": clients,
            "num_clients": len(clients),
            "examples": sum(s.num_examples for s in submissions),
            "train_loss": _weighted_mean([s.train_loss for s in submissions], output.weights),
            "client_validation_loss": _weighted_mean([s.validation_loss for s in submissions], output.weights),
            "validation_loss": _finite(output.validation_loss),
            "aggregation_error": _finite(output.aggregation_error),
            "global_rank": output.global_rank,
            "downlink": output.downlink,
            "bytes_in": sum(s.size for s in submissions),
            "bytes_out": self.bytes_out,
            "committed_unix": now,
            "seconds": {k: round(v, 4) for k, v in output.seconds.items()},
            "checkpoint": output.checkpoint,
        }
