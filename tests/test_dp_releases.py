"""Noisy passes released outside a committed round (issue 31): recorded before they leave, counted once.

Under differential privacy with secure aggregation an attempt sends its clients Q = orth(Y + N1)
before pass 2; when the attempt then fails, that Q was released all the same. The budget counts
it as one Gaussian mechanism on the failed attempt's sample, from ``dp_releases.jsonl``
(server/dp_releases.py), written before Q can be fetched. Unit tests of the budget against
dp-accounting's own composition, of the record across a kill and a resumed attempt (its Q sent
again is no new release), then a real secure DP round in one process (the server's
``RoundDriver`` and ``SecureRounds``, the clients' ``secure_stages``) whose first attempt loses a
client after Q was sent: the retried round's commit counts the abandoned pass, and Status, the
history, a restarted budget and the report agree.
"""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path

import pytest

dp = pytest.importorskip("dp_accounting")

import test_secure_wire as wire
from flora.client import secure_stages
from flora.common.methods import get_method
from flora.common.privacy.accountant import epsilon_of_rounds
from flora.server.admin.report import privacy_lines, write_report
from flora.server.config import ServerSettings
import flora.server.lifecycle as lifecycle
from flora.server.dp_releases import Release, ReleaseFileError, read_releases, record_release
from flora.server.layout import Layout
from flora.server.lifecycle import RoundDriver
from flora.server.privacy_budget import PrivacyBudget, privacy_status
from flora.server.round_settings import round_policy
from flora.server.rounds import RoundMachine, RoundState
from flora.server.secure_round import SecureRounds, _label
from flora.server.secure_state import AttemptFiles
from flora.server.store import ClientRecord, RunRecord, Store, Submission
from test_dp_settings import DP
from test_server_config import settings_from
from test_secure_state import _drive

SIGMA, DELTA = 4.0, 1e-5  # test_dp_settings.DP's noise multiplier; delta the default at its min_clients


def by_hand(events: list[tuple[int, int, int]], delta: float = DELTA) -> float:
    """dp-accounting's own RDP composition of (population, selected, mechanisms) events at SIGMA."""
    accountant = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    for n, k, mechanisms in events:
        gaussian = dp.SelfComposedDpEvent(dp.GaussianDpEvent(SIGMA / 2), mechanisms)  # replace-one: sensitivity 2C
        accountant.compose(dp.SampledWithoutReplacementDpEvent(n, k, gaussian))
    return accountant.get_epsilon(delta)


def commit(budget: PrivacyBudget, history: list[dict], number: int, attempt: int, sample: tuple[int, int]) -> dict:
    """What the driver does when round ``number`` commits on ``attempt``: its history line, then spent."""
    record = {"round": number, "attempts": attempt, **budget.record(number, attempt, *sample)}
    budget.committed(record)
    history.append(record)
    return record


def release(budget: PrivacyBudget, path: Path, number: int, attempt: int, sample: tuple[int, int]) -> Release:
    """What the driver does before a secure attempt sends Q: record durably, then count."""
    entry = record_release(path, budget.release_of(number, attempt, *sample, time.time()))
    budget.add_release(entry)
    return entry


def test_a_released_first_pass_of_an_attempt_that_did_not_commit_is_one_more_mechanism(tmp_path):
    path = Layout(tmp_path).dp_releases
    budget, history = PrivacyBudget.of_run(settings_from(DP), []), []
    commit(budget, history, 1, 1, (3, 3))
    entry = release(budget, path, 2, 1, (3, 3))  # round 2's attempt 1 sent Q, then lost a client
    assert entry.dp_epsilon == pytest.approx(by_hand([(3, 3, 2), (3, 3, 1)]), rel=1e-9)
    assert budget.spent == entry.dp_epsilon > history[0]["dp_epsilon"]  # counted as soon as Q may leave
    release(budget, path, 2, 2, (4, 2))  # attempt 2 sends its Q and commits: its pass 1 is one of its passes
    record = commit(budget, history, 2, 2, (4, 2))
    assert record["dp_epsilon"] == pytest.approx(by_hand([(3, 3, 2), (3, 3, 1), (4, 2, 2)]), rel=1e-9)
    assert budget.spent == record["dp_epsilon"] and [r.key for r in budget.released] == [(2, 1)]
    assert record["dp_epsilon"] > epsilon_of_rounds(SIGMA, [(3, 3), (4, 2)], 2, DELTA)  # what it was before: short


def test_a_retry_after_an_abandoned_release_is_refused_where_the_release_passes_the_target(tmp_path):
    path = Layout(tmp_path).dp_releases
    without = epsilon_of_rounds(SIGMA, [(3, 3)] * 2, 2, DELTA)
    with_release = by_hand([(3, 3, 2), (3, 3, 1), (3, 3, 2)])
    target = (without + with_release) / 2
    budget = PrivacyBudget.of_run(settings_from(DP + ["--dp-target-epsilon", f"{target}"]), [])
    commit(budget, [], 1, 1, (3, 3))
    assert budget.refusal(2, 3, 3) is None
    release(budget, path, 2, 1, (3, 3))
    assert budget.refusal(2, 3, 3) == (f"privacy budget: round 2 would spend epsilon {with_release:.4g} > target "
                                       f"{target:g} (delta 1e-05, 3 of 3 clients); the run ends at version 1")


def test_the_record_survives_a_kill_and_a_release_is_never_counted_twice(tmp_path):
    """"Kill" = rebuild the budget from what is on disk. A resumed attempt records its Q again
    (the same Q, re-sent): the line of that (round, attempt) stays as it was."""
    settings, path = settings_from(DP), Layout(tmp_path).dp_releases
    budget, history = PrivacyBudget.of_run(settings, []), []
    first = release(budget, path, 1, 1, (3, 3))
    again = PrivacyBudget.of_run(settings, history, read_releases(path))
    assert again.spent == budget.spent == first.dp_epsilon and again.delta == DELTA
    wider = settings_from(DP + ["--min-clients", "20000"])  # its default delta is 5e-6: the run's stays the first one's
    assert PrivacyBudget.of_run(wider, history, read_releases(path)).delta == DELTA
    assert release(again, path, 1, 1, (3, 3)) == first and len(read_releases(path)) == 1  # resumed: no new line
    assert again.spent == first.dp_epsilon and len(again.released) == 1
    release(again, path, 1, 2, (3, 3))  # the retry: a fresh Q, a release of its own, then its commit
    record = commit(again, history, 1, 2, (3, 3))
    restarted = PrivacyBudget.of_run(settings, history, read_releases(path))
    assert [r.key for r in read_releases(path)] == [(1, 1), (1, 2)] and [r.key for r in restarted.released] == [(1, 1)]
    assert restarted.spent == pytest.approx(record["dp_epsilon"]) == pytest.approx(by_hand([(3, 3, 1), (3, 3, 2)]))


def test_a_damaged_record_is_refused_naming_its_line(tmp_path):
    path = Layout(tmp_path).dp_releases
    release(PrivacyBudget.of_run(settings_from(DP), []), path, 1, 1, (3, 3))
    path.write_text(path.read_text() + '{"round": 1, "attempt": 2}\n')
    with pytest.raises(ReleaseFileError, match=r"dp_releases.jsonl: line 2 is not a differential privacy release"):
        read_releases(path)


# --- a secure attempt cut after its Q was sent, resumed by a new server object -----------------------------------


def test_a_resumed_attempt_sends_its_q_again_without_a_new_release(tmp_path):
    """The first client answered pass 2 (so Q had been sent), then the server stopped; a new
    SecureRounds over the same files resumes the attempt and re-sends the same Q: recorded once."""
    path, budget, calls = Layout(tmp_path).dp_releases, PrivacyBudget.of_run(settings_from(DP), []), []

    async def released(number: int, attempt: int) -> None:  # write-ahead: no client can fetch Q yet
        assert not secure._attempt.steps and not secure._attempt.downloads and secure._attempt.server.stage == 1
        calls.append((number, attempt))
        release(budget, path, number, attempt, (3, 3))

    secure, aggregator, current, clients, submissions = _secure_attempt(released)

    async def cut_short() -> None:
        with pytest.raises(asyncio.CancelledError):
            await _drive(secure, clients, submissions, "mask2")

    asyncio.run(cut_short())
    assert calls == [(1, 1)] and len(read_releases(path)) == 1
    again = SecureRounds(secure.settings, aggregator, "run-1", lambda: None, released=released)
    again.resume(current)
    assert again._attempt.sketch is not None  # the Q saved with the attempt, the one the clients got
    output = asyncio.run(_drive(again, clients, submissions, None))
    assert output.secure["survivors"] == 3 and calls == [(1, 1)] and [r.key for r in read_releases(path)] == [(1, 1)]


@pytest.mark.parametrize("recorded", [False, True], ids=["before-the-record", "after-the-record"])
def test_a_kill_at_the_record_sends_no_q_that_a_resumed_attempt_has_not_recorded(tmp_path, recorded):
    """The server dies in the hook (before its record is on disk, or right after): nothing saved may
    yet say that pass 2 is next, so the resumed attempt computes pass 1 again and records before
    its Q goes out (a hook run after the sketch or the state was saved would be skipped by the
    resume, and that Q sent unrecorded). The same (round, attempt) has one line either way."""
    path, budget, calls = Layout(tmp_path).dp_releases, PrivacyBudget.of_run(settings_from(DP), []), []

    async def dies(number: int, attempt: int) -> None:
        assert not secure._attempt.saved.files.sketch.exists()
        calls.append("killed")
        if recorded:
            release(budget, path, number, attempt, (3, 3))
        raise asyncio.CancelledError

    secure, aggregator, current, clients, submissions = _secure_attempt(dies)

    async def killed() -> None:
        with pytest.raises(asyncio.CancelledError):
            await _drive(secure, clients, submissions, None)

    asyncio.run(killed())
    assert [r.key for r in read_releases(path)] == ([(1, 1)] if recorded else [])

    async def released(number: int, attempt: int) -> None:
        assert not again._attempt.steps and not again._attempt.downloads  # Q is still with the server
        calls.append((number, attempt))
        release(budget, path, number, attempt, (3, 3))

    again = SecureRounds(secure.settings, aggregator, "run-1", lambda: None, released=released)
    again.resume(current)
    output = asyncio.run(_drive(again, clients, submissions, None))
    assert output.secure["survivors"] == 3 and calls == ["killed", (1, 1)]
    assert [r.key for r in read_releases(path)] == [(1, 1)]


def _secure_attempt(released):
    """Attempt 1 of a secure DP round over three clients that advertised their keys, with the hook
    ``released``: (server, aggregator, current round, clients, submissions)."""
    kept, updates = wire.method_round("flora")
    secure, aggregator, current, ids = wire.setup("flora", dp_noise_multiplier=SIGMA, dp_clip_norm=0.5)
    secure.released = released
    clients = {}
    for client_id, u in zip(ids, updates):
        link = wire.Loopback(secure, client_id)
        link.current = current
        info = secure.round_info(client_id, current)
        clients[client_id] = link, secure_stages.advertise(link, wire.spec(secure.settings), info, wire.header(1, u.rank, 10),
                                                           u, kept, get_method("flora"))
    return secure, aggregator, current, clients, [_submission(c, u.rank) for c, u in zip(ids, updates)]


def _submission(client_id: str, rank: int, number: int = 1, path: str = "", sha256: str = "0" * 64) -> Submission:
    return Submission(round=number, client_id=client_id, sha256=sha256, path=path, size=0, rank=rank,
                      alpha=wire.SCALING * rank, scaling_rule=1, num_examples=10, base_version=0, train_loss=None,
                      validation_loss=None, steps=1, train_seconds=0.0, received=0.0)


# --- a real secure DP round in one process: one client lost after Q, the round retried ----------------------------


class Run:
    """The server's round driver over a real state directory (the aggregator's write left out), and
    three clients answering their secure steps from threads as the reference client does."""

    def __init__(self, root: Path) -> None:
        self.settings = ServerSettings(method="flora", secure_aggregation=True, secure_stage_deadline_s=60.0,
                                       max_weight_share=1.0, lora_rank=4, lora_alpha=8.0, dp_noise_multiplier=SIGMA,
                                       dp_clip_norm=0.5, min_clients=3, rounds=1, state_dir=root,
                                       client_timeout_s=600, round_deadline_s=600)
        self.layout = Layout(root)
        self.layout.create()
        self.store = Store(self.layout.database)
        self.store.create_run(RunRecord("run-1", "m", "h", "flora", sorted(wire.SHAPES), {}, 0, 0.0), [], None)
        _, self.updates = wire.method_round("flora")
        self.ids = [f"0{name}" for name in "abc"]  # lowercase hex, as the server makes them
        for k, client_id in enumerate(self.ids):
            self.store.add_client(ClientRecord(client_id, client_id, f"t{k}", 4, 8.0, 1, 10, "cpu", "x", 0.0))
        self.driver = RoundDriver(self.settings, self.layout, self.store, wire.FakeAggregator(layout=self.layout),
                                  RoundMachine(round_policy(self.settings)))
        self.driver.use_secure_aggregation("run-1")
        self.lost: dict[int, set[str]] = {}  # by attempt: clients silent from their pass-2 masked input on
        self.clients: dict[str, tuple] = {}
        self.busy: set[str] = set()

    def advertise(self) -> None:
        """Each client of the open attempt trains (the same update) and advertises fresh keys."""
        machine, secure, current = self.driver.machine, self.driver.secure, self.driver.machine.current
        for client_id, u in zip(self.ids, self.updates):
            link = wire.Loopback(secure, client_id)
            link.current = current
            self.clients[client_id] = link, secure_stages.advertise(
                link, wire.spec(self.settings), secure.round_info(client_id, current), wire.header(1, u.rank, 10), u,
                None, get_method("flora"))
            sha = f"{current.attempt:x}{client_id[-1]}".ljust(64, "0")
            self.store.add_submission(_submission(client_id, u.rank, path=self.layout.relative(
                self.layout.update(1, client_id, sha)), sha256=sha))
            self.driver.apply(machine.accept(client_id, 1, sha, time.time()))

    def answer_steps(self) -> None:
        loop = asyncio.get_running_loop()
        lost = self.lost.get(self.driver.machine.current.attempt, set())
        for client_id, (link, session) in self.clients.items():
            task = None if client_id in self.busy else self.driver.secure.task_for(client_id)
            if task is None or (client_id in lost and _label(task) == "mask2"):
                continue
            self.busy.add(client_id)
            link.loop = loop
            done = loop.run_in_executor(None, secure_stages.handle, link, session, task)
            done.add_done_callback(lambda f, c=client_id: (f.exception(), self.busy.discard(c), self.answer_steps()))
        self.close_without_the_lost(lost)

    def close_without_the_lost(self, lost: set[str]) -> None:
        """Once only the lost clients' pass-2 inputs are missing, close the step as its deadline
        would (without waiting one out: a live client on a loaded machine must never miss it, so
        every attempt but the one that loses a client commits)."""
        att = self.driver.secure._attempt
        if att is not None and att.steps and all(att.ids[i] in lost and _label(task) == "mask2"
                                                 for i, task in att.steps.items()):
            att.done.set()

    async def commit_round(self) -> None:
        """Open round 1 over the three clients and drive it to its commit, every attempt advertised."""
        self.driver.secure.notify = lambda: asyncio.get_running_loop().call_soon(self.answer_steps)
        machine, advertised = self.driver.machine, set()
        for client_id in self.ids:
            machine.joined(client_id, time.time())
        self.driver.advance()
        async with asyncio.timeout(60):
            while machine.version < 1:
                if machine.current.state is RoundState.OPEN and machine.current.attempt not in advertised:
                    advertised.add(machine.current.attempt)
                    self.advertise()
                await asyncio.sleep(0.05)
        await self.driver.stop()


def test_a_secure_dp_round_retried_after_its_q_was_sent_counts_the_abandoned_pass(tmp_path):
    run = Run(tmp_path / "state")
    path = run.layout.dp_releases
    run.lost = {1: {run.ids[2]}}  # attempt 1: client c sends no pass-2 input, after Q was sent to all three
    spent_once = {}  # by attempt: the budget's spent epsilon once its Q was recorded, before it goes out

    async def released(number: int, attempt: int) -> None:
        await run.driver.released(number, attempt)
        spent_once[attempt] = run.driver.privacy.spent

    run.driver.secure.released = released
    asyncio.run(run.commit_round())  # attempt 2: every client back, fresh keys; it commits
    assert spent_once[1] == pytest.approx(by_hand([(3, 3, 1)]), rel=1e-9)  # counted as soon as Q may leave
    assert spent_once[2] == pytest.approx(by_hand([(3, 3, 1)] * 2), rel=1e-9)  # and so is attempt 2's, until it commits
    (record,) = run.store.history()
    releases = read_releases(path)
    assert record["attempts"] == 2 and [(r.key, r.population, r.selected, r.mechanisms) for r in releases] == [
        ((1, 1), 3, 3, 1), ((1, 2), 3, 3, 1)]
    spent = by_hand([(3, 3, 1), (3, 3, 2)])
    assert record["dp_epsilon"] == pytest.approx(spent, rel=1e-9)
    assert record["dp_epsilon"] > epsilon_of_rounds(SIGMA, [(3, 3)], 2, DELTA)  # the committed round alone: short
    # Status (and flora-admin status, and the metrics gauge: the same budget), a restart, and the report agree.
    assert privacy_status(run.driver.privacy, 0.5, "").epsilon == record["dp_epsilon"] == run.driver.privacy.spent
    restarted = PrivacyBudget.of_run(run.settings, run.store.history(), releases)
    assert restarted.spent == pytest.approx(record["dp_epsilon"]) and [r.key for r in restarted.released] == [(1, 1)]
    run.store.close()
    report = write_report(run.layout.root, tmp_path / "report", require_png=False).markdown.read_text()
    assert (f"epsilon {spent:.4g} at delta 1e-05 after 1 rounds and 1 released first pass(es) of "
            "attempts that did not commit") in report and "1 (attempt 1 not committed: pass 1 released)" in report


def test_the_report_lists_a_release_after_the_last_commit_and_its_spent_epsilon():
    line = {"round": 1, "attempts": 1, "dp_epsilon": 1.5, "dp_delta": DELTA, "dp_population": 3, "dp_selected": 3}
    after = Release(round=2, attempt=1, population=3, selected=2, mechanisms=1, dp_epsilon=2.25, dp_delta=DELTA,
                    released_unix=0.0)
    committed = Release(round=1, attempt=1, population=3, selected=3, mechanisms=1, dp_epsilon=1.0, dp_delta=DELTA,
                        released_unix=0.0)
    text = "\n".join(privacy_lines([line], [committed, after]))
    assert text.startswith("Differential privacy (client level): epsilon 2.25 at delta 1e-05 after 1 rounds and 1 "
                           "released first pass(es)")
    assert "2 (attempt 1 not committed: pass 1 released) | 2 of 3" in text
    assert "1 (attempt 1 not committed" not in text  # round 1's attempt 1 committed: one of its passes


@pytest.mark.parametrize("full", ["record", "sketch"])
def test_a_full_disk_at_the_release_is_waited_out_and_the_attempt_goes_on(tmp_path, monkeypatch, full):
    """Q stays with the server until its record is on disk; a full disk then (``record``), or while
    the recorded Q is saved with the attempt (``sketch``), is waited out as every other write of a
    round is (tests/test_disk_full.py), and the attempt goes on with that Q: no client trains
    again, and no budget is spent on a release that a failed attempt wasted."""
    failures = []

    def full_once(write):
        def once(*args):
            if not failures:
                failures.append(full)
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(*args)
        return once

    if full == "record":
        monkeypatch.setattr(lifecycle, "record_release", full_once(record_release))
    else:
        monkeypatch.setattr(AttemptFiles, "write_sketch", full_once(AttemptFiles.write_sketch))
    run = Run(tmp_path / "state")
    asyncio.run(run.commit_round())
    (record,) = run.store.history()
    assert failures == [full] and record["attempts"] == 1 and not record["excluded"]
    assert [r.key for r in read_releases(run.layout.dp_releases)] == [(1, 1)]
    assert record["dp_epsilon"] == pytest.approx(epsilon_of_rounds(SIGMA, [(3, 3)], 2, DELTA), rel=1e-9)
