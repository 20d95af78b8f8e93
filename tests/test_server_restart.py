"""SIGKILL the server at the awkward moments and start it again: nothing lost, nothing repeated."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

import torch

from flora.common.basemodel import BUILTIN_MODEL, load_model
from flora.common.lora import LoraAdapter
from flora.common.merge import merged_update, module_weights
from flora.common.payload import read_adapter, read_update, read_weights
from flora.common.update import is_factors, module_delta
from flora.v1 import transfer_pb2
from harness import OPERATOR_TOKEN, ScriptedClient, artifacts, make_update, start_server, target_shapes

MERGED, LORA = transfer_pb2.ARTIFACT_KIND_MERGED_MODULES, transfer_pb2.ARTIFACT_KIND_GLOBAL_LORA

pytestmark = pytest.mark.slow

FLAGS = ("--min-clients", "2", "--rounds", "2", "--operator-token", OPERATOR_TOKEN, "--long-poll-s", "0.5",
         "--checkpoint-every", "1")


class Session:
    """Servers started on one state directory, one after the other, with the same clients."""

    def __init__(self, state_dir: Path, *extra: str):
        self.state_dir = state_dir
        self.extra = extra
        self.servers = []
        self.start()
        base_hash = self.operator.status().run.base_model_hash
        self.alice = ScriptedClient(self.server.address, "alice", rank=4, alpha=8.0, num_examples=10)
        self.bob = ScriptedClient(self.server.address, "bob", rank=2, alpha=4.0, num_examples=30)
        self.alice.join(base_hash)
        self.bob.join(base_hash)

    @property
    def server(self):
        return self.servers[-1]

    def start(self) -> None:
        self.servers.append(start_server(self.state_dir, *FLAGS, *self.extra))
        self.operator = ScriptedClient(self.server.address, "operator", token=OPERATOR_TOKEN)

    def restart_after_kill(self) -> None:
        """SIGKILL the server and start a new one; the clients keep their tokens and reconnect."""
        self.server.kill()
        self.start()
        for client in (self.alice, self.bob):
            client.close()
            new = ScriptedClient(self.server.address, client.name, client.rank, client.alpha, client.num_examples,
                                 client.token, client.client_id, client.spec)
            client.__dict__.update(new.__dict__)

    def adapter(self, client: ScriptedClient, number: int) -> LoraAdapter:
        return client.adapter(seed=10 * number + len(client.name))

    def payload(self, client: ScriptedClient, number: int) -> bytes:
        return make_update(self.adapter(client, number), client.alpha, number)

    def history(self) -> list[dict]:
        path = self.state_dir / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def global_sha(self, version: int) -> str:
        return hashlib.sha256((self.state_dir / "downlink" / f"v{version:06d}.safetensors").read_bytes()).hexdigest()

    def kill_all(self) -> None:
        for server in self.servers:
            server.kill()


@pytest.fixture()
def session(tmp_path):
    created = Session(tmp_path / "state")
    yield created
    created.kill_all()


def test_sigkill_between_two_submissions_keeps_the_first(session):
    session.alice.wait_for_train()
    first = session.payload(session.alice, 1)
    assert session.alice.submit(first, 1).accepted
    before = session.operator.status().round
    session.restart_after_kill()
    after = session.operator.status()
    assert after.global_version == 0
    assert (after.round.round, after.round.state, list(after.round.submitted)) == (1, "open", [session.alice.client_id])
    assert after.round.deadline_unix_ms == before.deadline_unix_ms and list(after.round.selected) == list(before.selected)
    assert session.alice.submit(first, 1).duplicate  # the upload survived, and is not counted twice
    assert session.bob.wait_for_train().round == 1
    assert session.bob.submit(session.payload(session.bob, 1), 1).accepted
    session.operator.wait_for_version(1)
    assert [h["round"] for h in session.history()] == [1]
    assert session.history()[0]["num_clients"] == 2


def test_sigkill_after_aggregation_never_redoes_the_round(session):
    session.alice.wait_for_train()
    for client in (session.alice, session.bob):
        assert client.submit(session.payload(client, 1), 1).accepted
    session.operator.wait_for_version(1)
    digest = session.global_sha(1)
    session.restart_after_kill()
    status = session.operator.status()
    assert status.global_version == 1 and status.round.round == 2
    assert "again" not in session.server.output()
    assert session.global_sha(1) == digest
    for client in (session.alice, session.bob):
        assert client.wait_for_train().round == 2
        assert client.submit(session.payload(client, 2), 2).accepted
    session.operator.wait_for_version(2)
    assert [h["round"] for h in session.history()] == [1, 2]
    with sqlite3.connect(session.state_dir / "state.db") as db:
        assert db.execute("SELECT round, state FROM rounds ORDER BY round, attempt").fetchall() == [(1, "done"), (2, "done")]


def test_an_interrupted_aggregation_is_redone_exactly_once(session, tmp_path):
    session.alice.wait_for_train()
    merged0 = tmp_path / "merged-v0"  # removed once version 1 commits; a crash before the commit keeps it
    shutil.copyfile(session.state_dir / "merged" / "v000000.safetensors", merged0)
    for client in (session.alice, session.bob):
        assert client.submit(session.payload(client, 1), 1).accepted
    session.operator.wait_for_version(1)
    digest = session.global_sha(1)
    session.server.kill()
    rewind_to_before_commit(session.state_dir, merged0)
    session.start()
    status = session.operator.wait_for_version(1)
    assert "aggregating it again" in session.server.output()
    assert session.global_sha(1) == digest  # the same updates aggregate to the same bytes
    assert status.global_version == 1
    assert [h["round"] for h in session.history()] == [1]


def test_a_lossy_downlink_carries_its_remainder_across_a_restart(tmp_path):
    session = Session(tmp_path / "state", "--downlink-max-rank", "2", "--downlink-dtype", "bfloat16")
    try:
        shapes = target_shapes(session.alice.spec)
        exact = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
        for number in (1, 2):
            assert session.alice.wait_for_train().round == number
            for client, p in ((session.alice, 0.25), (session.bob, 0.75)):  # weights from 10 and 30 examples
                assert client.submit(session.payload(client, number), number).accepted
                adapter = session.adapter(client, number)
                for name in shapes:
                    exact[name] += p * adapter.delta(name, torch.float64)  # the adapter carries its scaling
            session.operator.wait_for_version(number)
            if number == 1:
                assert (session.state_dir / "remainders" / "v000001.safetensors").exists()
                session.restart_after_kill()  # the remainder must survive it
        record = session.history()[-1]["downlink"]
        assert record["rank_max"] <= 2 and record["retained_energy"] < 1.0 and record["remainder_norm"] > 0.0
        assert record["bytes"] == (session.state_dir / "downlink" / "v000002.safetensors").stat().st_size
        base = module_weights(load_model(BUILTIN_MODEL), sorted(shapes))
        weights, sent = dict(base), {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
        for version in (1, 2):
            update, _ = read_update(session.state_dir / "downlink" / f"v{version:06d}.safetensors", shapes)
            assert all(t.dtype == torch.bfloat16 for part in update.values() for t in (part if is_factors(part) else [part]))
            weights = merged_update(weights, update)  # what a client does
            for name in shapes:
                sent[name] += module_delta(update[name], torch.float64)
        server, _ = read_weights(artifacts(session.alice.fetch(MERGED, 2, 2))[2], shapes)
        remainder, _ = read_update(session.state_dir / "remainders" / "v000002.safetensors", shapes)
        for name in shapes:
            torch.testing.assert_close(weights[name], server[name], rtol=0, atol=1e-6)  # server == clients
            carried = module_delta(remainder[name], torch.float64) if name in remainder else 0.0
            error = torch.linalg.matrix_norm(sent[name] + carried - exact[name]) / torch.linalg.matrix_norm(exact[name])
            assert error < 1e-5  # nothing lost: sent + final remainder = the exact total
    finally:
        session.kill_all()


def rewind_to_before_commit(state_dir: Path, saved_merged0: Path) -> None:
    """Put the database where a crash during round 1's aggregation leaves it (its files stay)."""
    merged0 = state_dir / "merged" / "v000000.safetensors"
    shutil.copyfile(saved_merged0, merged0)
    with sqlite3.connect(state_dir / "state.db") as db:
        db.execute("DELETE FROM versions WHERE version = 1")
        db.execute("DELETE FROM artifacts WHERE version = 1")
        db.execute("INSERT INTO artifacts VALUES ('merged', 0, 'merged/v000000.safetensors', ?, ?)",
                   (hashlib.sha256(merged0.read_bytes()).hexdigest(), merged0.stat().st_size))
        db.execute("DELETE FROM rounds WHERE round = 2")
        db.execute("UPDATE rounds SET state = 'aggregating' WHERE round = 1")
        db.execute("UPDATE run SET version = 0")


def test_fedex_keeps_its_global_lora_across_a_sigkill(tmp_path):
    session = Session(tmp_path / "state", "--method", "fedex", "--lora-rank", "4", "--lora-alpha", "8")  # scaling 2
    try:
        shapes = target_shapes(session.alice.spec)
        assert session.alice.wait_for_train().start_from_global_lora
        for client in (session.alice, session.bob):
            assert client.submit(session.payload(client, 1), 1).accepted
        session.operator.wait_for_version(1)
        before = artifacts(session.alice.fetch(LORA, 1, 1))[1]
        session.restart_after_kill()
        task = session.alice.wait_for_train()
        assert (task.round, task.start_from_global_lora, task.global_lora_version) == (2, True, 1)
        served = artifacts(session.alice.fetch(LORA, 1, 1))[1]
        assert served == before  # the restarted server serves the same G1
        g1, _ = read_adapter(served, shapes)
        for client in (session.alice, session.bob):
            assert client.submit(session.payload(client, 2), 2).accepted
        session.operator.wait_for_version(2)
        update, _ = read_update(session.state_dir / "downlink" / "v000002.safetensors", shapes)
        for name in shapes:  # round 2 merges sum_k p_k (s B_k A_k - s B_G1[:, :r_k] A_G1[:r_k]): G1 survived the kill
            want = sum(p * (session.adapter(c, 2).delta(name, torch.float64)
                            - 2.0 * g1.pairs[name].b[:, :c.rank].double() @ g1.pairs[name].a[:c.rank].double())
                       for c, p in ((session.alice, 0.25), (session.bob, 0.75)))
            torch.testing.assert_close(module_delta(update[name], torch.float64), want, rtol=0, atol=1e-5)
    finally:
        session.kill_all()


def test_sigkill_mid_round_keeps_the_rounds_download_bytes_for_its_history(session):
    """Issue 28: a round whose downloads came before a SIGKILL was recorded with 'MB down 0'."""
    session.alice.wait_for_train()
    for client in (session.alice, session.bob):
        assert client.submit(session.payload(client, 1), 1).accepted
    session.operator.wait_for_version(1)
    assert session.alice.wait_for_train().round == 2
    fetched = sum(len(chunk.data) for chunk in session.alice.fetch(transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE, 0, 1))
    session.restart_after_kill()
    for client in (session.alice, session.bob):
        assert client.wait_for_train().round == 2
        assert client.submit(session.payload(client, 2), 2).accepted
    session.operator.wait_for_version(2)
    assert fetched > 0 and session.history()[-1]["bytes_out"] == fetched
