"""SIGKILL the server at the awkward moments and start it again: nothing lost, nothing repeated."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from harness import OPERATOR_TOKEN, ScriptedClient, make_update, start_server

pytestmark = pytest.mark.slow

FLAGS = ("--min-clients", "2", "--rounds", "2", "--operator-token", OPERATOR_TOKEN, "--long-poll-s", "0.5",
         "--checkpoint-every", "1")


class Session:
    """Servers started on one state directory, one after the other, with the same clients."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
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
        self.servers.append(start_server(self.state_dir, *FLAGS))
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

    def payload(self, client: ScriptedClient, number: int) -> bytes:
        return make_update(client.adapter(seed=10 * number + len(client.name)), client.alpha, number)

    def history(self) -> list[dict]:
        path = self.state_dir / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def global_sha(self, version: int) -> str:
        return hashlib.sha256((self.state_dir / "globals" / f"v{version:06d}.safetensors").read_bytes()).hexdigest()

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
