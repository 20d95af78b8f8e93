"""The saved secure-aggregation attempt (server/secure_state.py): what a restarted server resumes.

A two-stage round of four clients (client 3 drops before masking stage 1, and is recovered) is
played message by message; saved at every point where the server saves it and restored, the
rest of the round played on the restored server gives the same sums as the uninterrupted one.
A file that is damaged, of another run or attempt, or whose unmask request is not the one its
masked sum gives, is refused (the attempt then starts over), and no file holds a client's
vector in clear. Then ``SecureRounds`` itself: stopped after one answer of each step, a new one
over the same files resumes the attempt and the round merges what the plain method merges.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import test_secure_wire as wire

from flora.client import secure_stages
from flora.common.methods import get_method
from flora.common.secagg.client import ClientRound
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.finish import Sketch
from flora.common.secagg.messages import MaskedInput
from flora.common.secagg.server import ServerRound
from flora.server.rounds import Round, RoundState
from flora.server.secure_attempt import Attempt
from flora.server.secure_round import SecureRounds, _label
from flora.common.secagg.stream import masked_messages
from flora.common.secagg.wire import keys_digest, vector_bytes
from flora.server.errors import ResourceExhausted, Unavailable, resource_refusal
from flora.server.layout import Layout
from flora.server.secure_state import (
    AttemptFiles, GroupCommit, Identity, SavedAttempt, Untrusted, encode_state, load, stored_adverts,
)
from flora.server.store import Submission
from flora.v1 import run_pb2
from flora.v1 import secagg_pb2 as sa

ROUND, STAGES, THRESHOLD, LENGTH = 3, 2, 3, 64
SEED = bytes(range(32))
IDENTITY = Identity("run-1", ROUND, 1, ("a", "b", "c", "d"), SEED)
EXAMPLES = (10, 20, 30)  # the SecureRounds tests' clients' claims
PASS_ONE_SURVIVORS = frozenset({0, 1, 2})  # client 3 sends no masked input in stage 1
SKETCH = Sketch({"m.q": torch.arange(6, dtype=torch.float64).reshape(3, 2)}, {"m.k": torch.ones(2, 2)})


def vectors() -> dict[tuple[int, int], np.ndarray]:
    """(stage, client) -> the client's clear vector: distinctive values, easy to look for on disk."""
    rng = np.random.default_rng(7)
    return {(s, c): rng.integers(1 << 40, 1 << 41, LENGTH, dtype=np.uint64) for s in (1, 2) for c in range(4)}


def play() -> tuple[list[tuple], list[np.ndarray]]:
    """The round's server calls in order (each (method, *args)), and the sums of its two stages."""
    clients = {c: ClientRound(c, ROUND, SEED, STAGES, THRESHOLD) for c in range(4)}
    server, calls, sums, clear = ServerRound(ROUND, SEED, range(4), STAGES, THRESHOLD), [], [], vectors()

    def call(method: str, *args):
        calls.append((method, *args))
        return getattr(server, method)(*args)

    for c in range(4):
        call("receive_keys", clients[c].advertise())
    bundles = call("close_keys")
    for c in range(4):
        call("receive_shares", clients[c].share_keys(bundles[c]))
    inboxes = call("close_shares")
    for c in range(4):
        clients[c].receive_shares(inboxes[c])
    for stage, senders in ((1, (0, 1, 2)), (2, (0, 1, 2))):
        request = call("open_stage", stage, (LENGTH,))
        for c in senders:
            call("receive_masked", clients[c].mask(request, [clear[stage, c]]))
        unmask = call("close_masked")
        for c in unmask.survivors:
            call("receive_unmask", clients[c].unmask(unmask))
        sums.append(call("close_unmask").sums[0])
    return calls, sums


def save(server: ServerRound, folder: Path, uploads: Sequence[MaskedInput] = ()) -> AttemptFiles:
    """What SecureRounds writes at this point: the open MASK step's accepted uploads, the state
    that lists them, the stage's sum (written when the step closes), pass 1's sketch."""
    files = AttemptFiles(folder, ROUND, 1)
    folder.mkdir(parents=True, exist_ok=True)  # the server's first state write makes it, before any step
    for upload in uploads:
        files.write_upload(upload.stage, upload.sender, upload.vectors)
    digests = {u.sender: hashlib.sha256(vector_bytes(u.vectors[0])).hexdigest() for u in uploads}
    files.write_state(encode_state(IDENTITY, server, {"bits": 20}, {"bytes_up": {"share": 1.0}}, digests))
    files.write_masked(IDENTITY, server.stage, server.masked_sum, server.masked_from)
    if pass_two_next_or_open(server):
        files.write_sketch(IDENTITY, SKETCH, PASS_ONE_SURVIVORS)
    return files


def pass_two_next_or_open(server: ServerRound) -> bool:
    return server.stage == 2 or (server.stage == 1 and server.phase == "open")


def saved_at(calls: list[tuple], cut: int, folder: Path) -> tuple[ServerRound, AttemptFiles]:
    """A server that took the first ``cut`` calls, saved into ``folder``."""
    server = ServerRound(ROUND, SEED, range(4), STAGES, THRESHOLD)
    for method, *args in calls[:cut]:
        getattr(server, method)(*args)
    uploads = [args[0] for method, *args in calls[:cut] if method == "receive_masked" and args[0].stage == server.stage]
    return server, save(server, folder, uploads if server.phase == "mask" else ())


@pytest.fixture(scope="module")
def round_calls() -> tuple[list[tuple], list[np.ndarray]]:
    return play()


def test_a_round_saved_at_any_step_and_restored_ends_with_the_uninterrupted_rounds_sums(round_calls, tmp_path):
    calls, sums = round_calls
    clear = vectors()
    assert [s.tolist() for s in sums] == [sum(clear[s, c] for c in (0, 1, 2)).tolist() for s in (1, 2)]  # 3 recovered
    first = next(i for i, (m, *_) in enumerate(calls) if m == "close_keys") + 1  # saving starts with the share step
    for cut in range(first, len(calls)):
        server, files = saved_at(calls, cut, tmp_path / str(cut))
        restored = load(files, IDENTITY)
        again = restored.server
        assert (again.phase, again.stage, again.active) == (server.phase, server.stage, server.active), cut
        if server.phase in ("mask", "unmask"):  # between stages the next open_stage starts these afresh
            assert again.masked_from == server.masked_from and again.request == server.request, cut
            assert sorted(again.reveals) == sorted(server.reveals), cut
        assert sorted(again.sealed) == sorted(server.sealed), cut
        assert restored.plan == {"bits": 20} and restored.counters == {"bytes_up": {"share": 1.0}}
        if pass_two_next_or_open(server):
            assert restored.survivors == PASS_ONE_SURVIVORS and torch.equal(restored.sketch.q["m.q"], SKETCH.q["m.q"])
            assert torch.equal(restored.sketch.dense["m.k"], SKETCH.dense["m.k"])
        done = sum(1 for m, *_ in calls[:cut] if m == "close_unmask")
        rest = [getattr(again, m)(*a) for m, *a in calls[cut:]]
        assert [r.sums[0].tolist() for r in rest if hasattr(r, "sums")] == [s.tolist() for s in sums[done:]], cut


def test_no_saved_file_holds_a_clients_vector_in_clear(round_calls, tmp_path):
    calls, _ = round_calls
    pieces = [v[i:i + 2].astype("<u8").tobytes() for v in vectors().values() for i in range(0, LENGTH, 2)]
    for cut in range(len(calls)):
        _, files = saved_at(calls, cut, tmp_path / str(cut))
        for path in files.folder.iterdir():
            data = path.read_bytes()
            hexed = data.decode("latin-1")
            assert not any(p in data or p.hex() in hexed for p in pieces), (cut, path.name)


def test_a_damaged_file_or_one_of_another_run_or_attempt_is_not_resumed(round_calls, tmp_path):
    calls, _ = round_calls
    mid_unmask = next(i for i, (m, *_) in enumerate(calls) if m == "receive_unmask") + 1
    _, files = saved_at(calls, mid_unmask, tmp_path)
    good = files.state.read_bytes()
    assert load(files, IDENTITY).server.phase == "unmask"
    assert load(AttemptFiles(tmp_path / "none", ROUND, 1), IDENTITY) is None  # nothing saved: nothing to resume
    with pytest.raises(Untrusted, match="another attempt"):
        load(files, replace(IDENTITY, attempt=2))
    with pytest.raises(Untrusted, match="another run"):
        load(files, replace(IDENTITY, run_id="run-2"))
    with pytest.raises(Untrusted, match="another attempt"):
        load(files, replace(IDENTITY, ids=("a", "b", "c", "e")))
    files.state.write_bytes(good[:-20])
    with pytest.raises(Untrusted, match="damaged"):
        load(files, IDENTITY)
    doc = json.loads(good)
    doc["sealed"][0][1][0][1] = doc["sealed"][0][1][0][1][:-2]  # a ciphertext one byte short
    files.state.write_text(json.dumps(doc))
    with pytest.raises(Untrusted, match="ciphertext"):
        load(files, IDENTITY)
    doc = json.loads(good)
    doc["active"] = doc["active"][1:]  # pass 1 over fewer clients than shared their keys
    files.state.write_text(json.dumps(doc))
    with pytest.raises(Untrusted, match="active clients"):
        load(files, IDENTITY)


def test_a_resume_never_asks_a_holder_for_the_other_kind_of_share(round_calls, tmp_path):
    """The saved request must be the one the saved masked sum gives: a survivor cannot become
    dropped (its mask key asked for after its self-mask seed was) by editing what is on disk."""
    calls, _ = round_calls
    mid_unmask = next(i for i, (m, *_) in enumerate(calls) if m == "receive_unmask") + 1
    server, files = saved_at(calls, mid_unmask, tmp_path)
    doc = json.loads(files.state.read_bytes())
    stage, survivors, dropped = doc["request"]
    doc["request"] = [stage, survivors[1:], sorted([*dropped, survivors[0]])]
    files.state.write_text(json.dumps(doc))
    with pytest.raises(Untrusted, match="unmask request"):
        load(files, IDENTITY)
    files = save(server, tmp_path)  # the masked sum of another stage: no contributor of this one is known
    files.write_masked(IDENTITY, server.stage + 1, server.masked_sum, server.masked_from)
    with pytest.raises(Untrusted, match="unmask request|below the threshold"):
        load(files, IDENTITY)


def test_a_mask_step_resumes_from_the_kept_uploads_each_held_to_its_recorded_sha256(round_calls, tmp_path):
    """Mid MASK step the sum is not on disk: the restart re-adds the uploads the state lists; one
    missing or altered is refused (the attempt starts over), one not listed is not added."""
    calls, _ = round_calls
    masks = [i for i, (m, *_) in enumerate(calls) if m == "receive_masked" and calls[i][1].stage == 1]
    server, files = saved_at(calls, masks[1] + 1, tmp_path)  # two of stage 1's three uploads accepted
    files.masked.unlink()
    again = load(files, IDENTITY).server
    assert again.masked_from == server.masked_from == {0, 1}
    assert [s.tolist() for s in again.masked_sum] == [s.tolist() for s in server.masked_sum]
    files.write_upload(1, 2, calls[masks[2]][1].vectors)  # written, not listed (its acknowledgement never came)
    assert load(files, IDENTITY).server.masked_from == {0, 1}
    upload = files.upload(1, 1)
    data = bytearray(upload.read_bytes())
    data[0] ^= 1
    upload.write_bytes(bytes(data))
    with pytest.raises(Untrusted, match=f"{upload.name} is missing or not the upload accepted from client 1"):
        load(files, IDENTITY)
    upload.unlink()
    with pytest.raises(Untrusted, match="is missing"):
        load(files, IDENTITY)


def test_pass_two_is_not_resumed_without_pass_ones_sketch(round_calls, tmp_path):
    calls, _ = round_calls
    between = next(i for i, (m, *_) in enumerate(calls) if m == "close_unmask") + 1
    _, files = saved_at(calls, between, tmp_path)
    assert load(files, IDENTITY).sketch is not None
    files.sketch.unlink()
    with pytest.raises(Untrusted, match="sketch"):
        load(files, IDENTITY)


def test_advertisements_taken_from_the_stored_key_files_are_checked_against_their_recorded_digest(tmp_path):
    layout = Layout(tmp_path)
    rounds = [ClientRound(c, ROUND, SEED, STAGES, THRESHOLD) for c in range(2)]
    subs = []
    for c, client in enumerate(rounds):
        advert = client.advertise()
        keys = sa.PublicKeys(client=c, channel_key=advert.channel_key, mask_keys=advert.mask_keys)
        (tmp_path / f"{c}.keys").write_bytes(keys.SerializeToString())
        subs.append(replace(_submission(IDENTITY.ids[c], 2, 5), path=f"{c}.keys",
                            sha256=keys_digest(keys.channel_key, keys.mask_keys)))
    adverts = stored_adverts(layout, IDENTITY, subs, held={0})  # client 0's keys are in memory already
    assert adverts == [rounds[1].advertise()]
    with pytest.raises(SecAggError, match="not the ones it advertised"):
        stored_adverts(layout, IDENTITY, [replace(subs[1], sha256="0" * 64)], held=())
    with pytest.raises(SecAggError, match="not the ones it advertised"):  # client a's keys filed as client b's
        stored_adverts(layout, IDENTITY, [replace(subs[0], client_id=IDENTITY.ids[1])], held=())
    (tmp_path / "1.keys").write_bytes(b"\xff" * 7)
    with pytest.raises(SecAggError, match="cannot be read"):
        stored_adverts(layout, IDENTITY, subs[1:], held=())


def test_concurrent_flushes_share_writes_and_each_returns_after_a_write_that_covers_it():
    written: list[int] = []
    state = {"value": 0}

    def snapshot():
        taken = state["value"]
        return lambda: written.append(taken)

    commit = GroupCommit(snapshot)

    async def change_and_flush(value: int) -> int:
        state["value"] = value
        await commit.flush()
        return written[-1]

    async def main() -> list[int]:
        return await asyncio.gather(*(change_and_flush(v) for v in range(1, 11)))

    seen = asyncio.run(main())
    assert len(written) <= 2 and written[-1] == 10
    assert all(after >= value for value, after in zip(range(1, 11), seen))


# --- SecureRounds cut short at a step and resumed by a new one over the same files ---------------


@pytest.mark.parametrize("point", ["share", "mask1", "unmask1", "mask2", "unmask2"])
def test_secure_rounds_cut_at_a_step_resume_in_a_new_server_object_and_merge_the_plain_result(point):
    """The first client answers step ``point`` and the server stops there (its task cancelled,
    as a killed process stops); a new SecureRounds over the same state directory resumes the
    attempt, the other clients answer (the first is not asked again: it would refuse), and the
    round's result is the plain method's over all three."""
    again, clients, submissions, aggregator = _cut_and_resume(point)
    output = asyncio.run(_drive(again, clients, submissions, None))
    (result, _), = aggregator.results
    kept, updates = wire.method_round("flora")
    plain = get_method("flora").merge(kept, updates, [n / sum(EXAMPLES) for n in EXAMPLES], torch.float64)
    wire.assert_same_adapter(result.delta, plain.delta)
    assert output.secure["survivors"] == 3


def test_an_accepted_upload_is_kept_as_received_and_the_sum_written_once_when_the_step_closes():
    """Mid MASK step the server has written the accepted upload, not the running sum (the cost of
    an acknowledgement is the upload's own bytes); once the round is done no upload is left."""
    again, clients, submissions, _ = _cut_and_resume("mask1")
    files = again._attempt.saved.files
    assert files.upload(1, 0).exists() and not files.masked.exists()
    assert json.loads(files.state.read_bytes())["uploads"][0][0] == 0
    asyncio.run(_drive(again, clients, submissions, None))
    assert not list(files.folder.glob("*.masked")) and files.masked.exists()


def test_a_client_whose_process_restarted_meanwhile_is_a_dropout_recovered_in_pass_one_fatal_in_pass_two():
    """Its secrets are gone with its process: it answers nothing after the resume."""
    again, clients, submissions, aggregator = _cut_and_resume("mask1", deadline=2.0)
    lost = list(clients)[2]
    output = asyncio.run(_drive(again, clients, submissions, None, lost={lost}))
    (result, decisions), = aggregator.results
    kept, updates = wire.method_round("flora")
    plain = get_method("flora").merge(kept, updates[:2], [1 / 3, 2 / 3], torch.float64)
    wire.assert_same_adapter(result.delta, plain.delta)
    assert (output.secure["survivors"], output.secure["dropouts_recovered"]) == (2, 1) and decisions[2].rejected
    again, clients, submissions, _ = _cut_and_resume("mask2", deadline=2.0)
    with pytest.raises(SecAggError, match="the attempt starts over"):
        asyncio.run(_drive(again, clients, submissions, None, lost={lost}))


def test_an_untrusted_saved_attempt_starts_over_and_another_attempts_files_are_not_resumed(caplog):
    again, clients, submissions, aggregator = _cut_and_resume("mask1")
    files = again._attempt.saved.files
    current = Round(number=1, attempt=1, state=RoundState.AGGREGATING, selected=frozenset(clients))
    files.state.write_bytes(files.state.read_bytes()[:-40])  # damaged (a disk fault): said, and not resumed
    third = SecureRounds(again.settings, aggregator, "run-1", lambda: None)
    third.resume(current)
    assert third._attempt is None and "cannot be trusted" in caplog.text and "starts over with fresh keys" in caplog.text
    with pytest.raises(SecAggError, match="the attempt starts over"):
        asyncio.run(_drive(third, clients, submissions, None))
    fourth = SecureRounds(again.settings, aggregator, "run-1", lambda: None)
    fourth.resume(replace(current, attempt=2, state=RoundState.OPEN))  # the next attempt: fresh keys, no file of its own
    assert fourth._attempt.server.phase == "advertise" and not files.state.exists()  # attempt 1's files are gone


def _cut_and_resume(point: str, deadline: float = 5.0) -> tuple[SecureRounds, dict, list[Submission], object]:
    """A flora round's SecureRounds whose first client answered step ``point`` before the server
    stopped, and a new SecureRounds resumed from its files (with the clients and submissions)."""
    kept, updates = wire.method_round("flora")
    secure, aggregator, current, ids = wire.setup("flora", deadline=deadline)
    clients = {}
    for client_id, u, n in zip(ids, updates, EXAMPLES):
        link = wire.Loopback(secure, client_id)
        link.current = current
        info = secure.round_info(client_id, current)
        clients[client_id] = link, secure_stages.advertise(link, wire.spec(), info, wire.header(1, u.rank, n), u, kept,
                                                           get_method("flora"))
    submissions = [_submission(c, u.rank, n) for c, u, n in zip(ids, updates, EXAMPLES)]

    async def cut_short() -> None:
        with pytest.raises(asyncio.CancelledError):
            await _drive(secure, clients, submissions, point)

    asyncio.run(cut_short())
    again = SecureRounds(secure.settings, aggregator, "run-1", lambda: None)
    again.resume(current)
    assert again._attempt.server.phase != "advertise"
    return again, clients, submissions, aggregator


async def _drive(server: SecureRounds, clients: dict, submissions: list[Submission], cut: str | None,
                 lost: frozenset[str] = frozenset()):
    """``server.aggregate`` with every client but the ``lost`` answering its steps from a thread;
    with ``cut``, only the first client answers that step, and then the task running this stops."""
    busy: set[str] = set()
    main, first = asyncio.current_task(), next(iter(clients))

    def answer_steps() -> None:
        loop = asyncio.get_running_loop()
        for client_id, (link, session) in clients.items():
            task = None if client_id in busy else server.task_for(client_id)
            if task is None or client_id in lost or (cut == _label(task) and client_id != first):
                continue
            busy.add(client_id)
            link.secure, link.loop, stop = server, loop, cut == _label(task)
            done = loop.run_in_executor(None, secure_stages.handle, link, session, task)
            done.add_done_callback(lambda f, c=client_id, stop=stop: (
                f.exception(), busy.discard(c), main.cancel() if stop else answer_steps()))

    server.notify = lambda: asyncio.get_running_loop().call_soon(answer_steps)
    return await server.aggregate(1, submissions)


def _submission(client_id: str, rank: int, examples: int) -> Submission:
    return Submission(round=1, client_id=client_id, sha256="0" * 64, path="", size=0, rank=rank, alpha=2.0 * rank,
                      scaling_rule=run_pb2.SCALING_RULE_STANDARD, num_examples=examples, base_version=0, train_loss=None,
                      validation_loss=None, steps=1, train_seconds=0.0, received=0.0)


def test_a_second_stream_of_a_client_while_its_upload_is_kept_is_refused_not_counted(monkeypatch):
    """A client's upload is being written when another stream of the same client ends (a retry
    with other bytes): refused as in progress. Before, the second was checked, written over the
    first's file and counted in its place, so the sum held the wrong vector and the kept file no
    longer matched the sha256 listed for it."""
    keep, stream, original_aggregate = SavedAttempt.save_upload, SecureRounds.masked, SecureRounds.aggregate
    outcome: list[str] = []

    async def save_upload(self, stage, client, vectors):
        secure = SecureRounds._current_secure
        if stage == 1 and not outcome:
            outcome.append("pending")
            other = [np.zeros(n, dtype=np.uint64) for n in secure._attempt.server.lengths]
            try:
                await stream(secure, secure._attempt.ids[client], wire._aiter(masked_messages(1, 1, other, 4096)))
                outcome[0] = "counted"
            except Unavailable:
                outcome[0] = "refused"
        await keep(self, stage, client, vectors)

    def aggregate(self, *args):
        monkeypatch.setattr(SecureRounds, "_current_secure", self, raising=False)
        return original_aggregate(self, *args)

    monkeypatch.setattr(SecureRounds, "aggregate", aggregate)
    monkeypatch.setattr(SavedAttempt, "save_upload", save_upload)
    updates = [wire.update(r, seed) for seed, r in enumerate(wire.RANKS)]
    result, *_ = wire.secure_round("flora", None, updates, [1, 1, 1])
    assert outcome == ["refused"]
    wire.assert_same_adapter(result.delta, get_method("flora").merge(None, updates, [1 / 3] * 3, torch.float64).delta)


def test_a_full_disk_while_keeping_an_upload_refuses_it_cleanly_and_the_retry_counts_once(monkeypatch):
    """The project's full-disk rule for a masked upload: RESOURCE_EXHAUSTED, nothing of it
    counted or listed, its step still open, so the client's retry is taken (once)."""
    keep, stream = AttemptFiles.write_upload, SecureRounds.masked
    seen: list[tuple] = []

    def write_upload(self, stage, client, vectors):
        if not seen:
            raise OSError(errno.ENOSPC, "No space left on device")
        keep(self, stage, client, vectors)

    async def masked(self, client_id, messages):
        pieces = [m async for m in messages]
        if not seen:
            with pytest.raises(OSError) as full:
                await stream(self, client_id, wire._aiter(pieces))
            att, index = self._attempt, self._attempt.index(client_id)
            seen.append((type(resource_refusal(full.value)), index in att.server.masked_from, index in att.uploads,
                         index in att.steps, index in att.streams))
        return await stream(self, client_id, wire._aiter(pieces))

    monkeypatch.setattr(AttemptFiles, "write_upload", write_upload)
    monkeypatch.setattr(SecureRounds, "masked", masked)
    updates = [wire.update(r, seed) for seed, r in enumerate(wire.RANKS)]
    result, *_ = wire.secure_round("flora", None, updates, [1, 1, 1])
    assert seen == [(ResourceExhausted, False, False, True, False)]
    wire.assert_same_adapter(result.delta, get_method("flora").merge(None, updates, [1 / 3] * 3, torch.float64).delta)


def test_a_resume_deletes_the_kept_uploads_its_state_does_not_list(round_calls, tmp_path):
    """Left by a crash: a closed step's uploads (after the state past it was saved, before they
    were deleted), one written but never listed, an interrupted write. The listed ones stay."""
    calls, _ = round_calls
    masks = [i for i, (m, *_) in enumerate(calls) if m == "receive_masked" and calls[i][1].stage == 1]
    _, files = saved_at(calls, masks[1] + 1, tmp_path)  # clients 0 and 1 listed in stage 1's MASK step
    stale = [files.upload(1, 2), files.upload(0, 0), tmp_path / f".{files.upload(1, 3).name}.0123abcd.tmp"]
    for path in stale:
        path.write_bytes(b"masked")
    attempt = Attempt.fresh(tmp_path, IDENTITY, ServerRound(ROUND, SEED, range(4), STAGES, THRESHOLD))
    assert attempt.resume() and set(attempt.uploads) == {0, 1}
    assert not [p for p in stale if p.exists()] and files.upload(1, 0).exists() and files.upload(1, 1).exists()


def test_a_full_disk_while_a_mask_steps_sum_is_saved_is_retried_not_skipped(monkeypatch):
    """The server waits a full disk out and retries the aggregation with the attempt in memory:
    the retry saves the closed step's sum and deletes its uploads. Before, the step counted as
    closed in memory, so the retry went on without the sum on disk (a restart in the unmask step
    could not resume) and the uploads stayed."""
    write, aggregate = AttemptFiles.write_masked, SecureRounds.aggregate
    saved: list[int] = []

    def write_masked(self, identity, stage, sums, contributors):
        if not saved:
            saved.append(0)
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, identity, stage, sums, contributors)
        saved.append(stage)

    async def retried(self, number, submissions):  # as the server's lifecycle does after a resource failure
        try:
            return await aggregate(self, number, submissions)
        except OSError as error:
            assert resource_refusal(error) is not None
            return await aggregate(self, number, submissions)

    monkeypatch.setattr(AttemptFiles, "write_masked", write_masked)
    monkeypatch.setattr(SecureRounds, "aggregate", retried)
    updates = [wire.update(r, seed) for seed, r in enumerate(wire.RANKS)]
    result, _, _, secure = wire.secure_round("flora", None, updates, [1, 1, 1])
    assert saved == [0, 1, 2] and not list(secure.folder.glob("*.masked"))
    wire.assert_same_adapter(result.delta, get_method("flora").merge(None, updates, [1 / 3] * 3, torch.float64).delta)


def test_a_full_disk_while_the_state_past_a_mask_step_is_saved_is_retried_and_the_uploads_go(monkeypatch):
    """The sum is saved, the state that says the step closed is not (a full disk): the retried
    aggregation saves that state, then deletes the step's uploads. Before, the retry went on with
    the step closed in memory and the uploads stayed on disk until a later attempt."""
    write, aggregate = AttemptFiles.write_state, SecureRounds.aggregate
    failed: list[int] = []

    def write_state(self, document):
        doc = json.loads(document)
        if (doc["stage"], doc["phase"]) == (1, "unmask") and not failed:
            failed.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, document)

    async def retried(self, number, submissions):  # as the server's lifecycle does after a resource failure
        try:
            return await aggregate(self, number, submissions)
        except OSError:
            return await aggregate(self, number, submissions)

    monkeypatch.setattr(AttemptFiles, "write_state", write_state)
    monkeypatch.setattr(SecureRounds, "aggregate", retried)
    updates = [wire.update(r, seed) for seed, r in enumerate(wire.RANKS)]
    result, _, _, secure = wire.secure_round("flora", None, updates, [1, 1, 1])
    assert failed and not list(secure.folder.glob("*.masked"))
    wire.assert_same_adapter(result.delta, get_method("flora").merge(None, updates, [1 / 3] * 3, torch.float64).delta)
