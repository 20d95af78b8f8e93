"""The SQLite store: what is committed survives reopening, and a round commits exactly once."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from flora.server.layout import Layout
from flora.server.rounds import Round, RoundState
from flora.server.store import Artifact, ClientRecord, RunRecord, Store, Submission

RUN = RunRecord("run1", "flora-tiny-llama", "f" * 64, "flora", ["m.q_proj"], {"method": "flora"}, 0, 1.0)


def client(id_: str, name: str) -> ClientRecord:
    return ClientRecord(id_, name, id_ * 8, 4, 8.0, 1, 10, "cpu", "0.1", 1.0)


def submission(number: int, client_id: str, sha: str = "a" * 64) -> Submission:
    return Submission(number, client_id, sha, f"updates/r{number:06d}/{client_id}.{sha}.safetensors", 100, 4, 8.0, 1,
                      10, number - 1, 1.5, None, 3, 0.5, 2.0)


@pytest.fixture()
def store(tmp_path):
    opened = Store(tmp_path / "state.db")
    opened.create_run(RUN, [Artifact("merged", 0, "merged/v000000.safetensors", "0" * 64, 10)], None)
    yield opened
    opened.close()


def test_a_fresh_database_has_no_run(tmp_path):
    fresh = Store(tmp_path / "fresh.db")
    assert fresh.run() is None
    fresh.close()


def test_everything_survives_reopening(tmp_path, store):
    store.add_client(client("c1", "alice"))
    store.add_client(client("c2", "bob"))
    store.set_left("c2")
    store.save_attempt(Round(1, 1, RoundState.OPEN, frozenset({"c1", "c2"}), 50.0, 1))
    store.add_submission(submission(1, "c1"))
    store.close()
    reopened = Store(tmp_path / "state.db")
    assert reopened.run() == RUN
    assert [(c.name, c.left) for c in reopened.clients()] == [("alice", False), ("bob", True)]
    restored = reopened.load_round(1)
    assert (restored.attempt, restored.state, restored.selected, restored.deadline) == (1, RoundState.OPEN, {"c1", "c2"}, 50.0)
    assert restored.accepted == {"c1": "a" * 64}
    assert reopened.submission(1, "c1") == submission(1, "c1")
    assert reopened.last_submitted_rounds() == {"c1": 1}
    reopened.close()


def test_names_tokens_and_submissions_are_unique(store):
    store.add_client(client("c1", "alice"))
    with pytest.raises(sqlite3.IntegrityError):
        store.add_client(client("c2", "alice"))
    store.add_submission(submission(1, "c1"))
    with pytest.raises(sqlite3.IntegrityError):
        store.add_submission(submission(1, "c1", "b" * 64))
    assert store.submissions(1) == [submission(1, "c1")]


def test_rejoin_updates_capabilities_and_clears_left(store):
    store.add_client(client("c1", "alice"))
    store.set_left("c1")
    store.rejoin_client(ClientRecord("c1", "alice", "c1" * 8, 16, 32.0, 2, 99, "cuda:0", "0.2", 1.0))
    (stored,) = store.clients()
    assert (stored.rank, stored.alpha, stored.scaling_rule, stored.left) == (16, 32.0, 2, False)


def test_a_round_commits_once_with_its_artifacts_and_history(store):
    store.add_client(client("c1", "alice"))
    store.save_attempt(Round(1, 2, RoundState.AGGREGATING, frozenset({"c1"}), 50.0, 1))
    artifacts = [Artifact("global", 1, "globals/v000001.safetensors", "1" * 64, 5),
                 Artifact("merged", 1, "merged/v000001.safetensors", "2" * 64, 6)]
    store.commit_version(1, 2, artifacts, {"round": 1}, 3.0)
    assert store.run().version == 1
    assert store.load_round(1).state is RoundState.DONE
    assert store.history() == [{"round": 1}]
    assert store.artifact("global", 1) == artifacts[0]
    assert store.artifacts("merged") == [artifacts[1]]  # only the latest merged weights are served
    with pytest.raises(RuntimeError, match="version 1"):
        store.commit_version(1, 2, artifacts, {"round": 1}, 4.0)
    assert store.history() == [{"round": 1}]


def test_a_failed_commit_changes_nothing(store):
    store.save_attempt(Round(1, 1, RoundState.AGGREGATING, frozenset(), 50.0, 1))
    bad = [Artifact("global", 1, "g", "1" * 64, 5), Artifact("global", 1, "g", "1" * 64, None)]  # NOT NULL violated
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_version(1, 1, bad, {"round": 1}, 3.0)
    assert store.run().version == 0 and store.history() == [] and store.artifact("global", 1) is None
    assert store.load_round(1).state is RoundState.AGGREGATING


def test_layout_names_come_from_ids_and_hashes_only(tmp_path):
    layout = Layout(tmp_path)
    assert layout.update(3, "ab12", "c" * 64).name == f"ab12.{'c' * 64}.safetensors"
    for bad_id in ("../x", "Alice", ""):
        with pytest.raises(ValueError):
            layout.update(3, bad_id, "c" * 64)
    with pytest.raises(ValueError, match="outside"):
        layout.absolute("../../etc/passwd")


def test_reads_answered_from_memory_follow_every_write(store):
    assert store.artifact("global", 1) is None and store.exclusions(1) == []  # read (and kept) before the writes
    store.add_client(client("c1", "alice"))
    store.add_submission(submission(1, "c1"))
    store.save_attempt(Round(1, 1, RoundState.AGGREGATING, frozenset({"c1"}), 50.0, 1))
    store.exclude_submissions(1, 1, {"c1": "NaN in lora_A"}, abandon=True, now=3.0)
    assert store.exclusions(1) == [("c1", "a" * 64, "NaN in lora_A")]
    artifact = Artifact("global", 1, "globals/v000001.safetensors", "1" * 64, 5)
    store.commit_version(1, 1, [artifact], {"round": 1}, 4.0)
    assert store.artifact("global", 1) == artifact
    store.exclusions(1).clear()  # a caller changing its copy changes nothing stored
    assert len(store.exclusions(1)) == 1


def test_durable_writes_fsync_the_wal_and_quick_commits_leave_that_to_their_caller(tmp_path, store, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    wal = str((tmp_path / "state.db-wal").resolve())
    store.add_client(client("c1", "alice"))
    store.add_submission(submission(1, "c1"))
    assert [c.id for c in store.clients()] == ["c1"] and store.submission(1, "c1") is not None  # visible at once
    assert wal not in synced  # the caller syncs before it acknowledges (in a worker thread)
    with pytest.raises(sqlite3.IntegrityError):
        store.add_submission(submission(1, "c1"))
    store.save_attempt(Round(1, 1, RoundState.OPEN, frozenset({"c1"}), 50.0, 1))
    assert synced.count(wal) == 1  # a durable write is on disk when it returns: the WAL fsynced
    assert store._db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL: no mode switches per commit
    store.sync()
    assert synced.count(wal) == 2
    reopened = Store(tmp_path / "state.db")
    try:
        assert reopened.submission(1, "c1") == submission(1, "c1")
        assert reopened.load_round(1).state == RoundState.OPEN
    finally:
        reopened.close()
    store.close()
    store.sync()  # no WAL after the last close: nothing left to sync


def test_a_durable_write_releases_the_lock_before_its_fsync(tmp_path, store, monkeypatch):
    """The event loop's quick inserts take the lock: they must not wait behind the disk."""
    free_during_fsync: list[bool] = []
    real_fsync = os.fsync

    def probing_fsync(fd: int) -> None:
        def probe() -> None:
            took = store._lock.acquire(timeout=0)
            if took:
                store._lock.release()
            free_during_fsync.append(took)

        other = threading.Thread(target=probe)
        other.start()
        other.join()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", probing_fsync)
    store.save_attempt(Round(1, 1, RoundState.OPEN, frozenset({"c1"}), 50.0, 1))
    assert free_during_fsync == [True]


def test_only_updates_excluded_for_their_own_fault_are_blamed_also_in_an_older_database(tmp_path):
    """Issue 28 item 3; a state directory of an earlier release has no ``blameless`` column."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE exclusions (round INTEGER NOT NULL, client_id TEXT NOT NULL, sha256 TEXT NOT NULL, "
                   "reason TEXT NOT NULL, excluded REAL NOT NULL, PRIMARY KEY (round, client_id, sha256))")
        db.execute("INSERT INTO exclusions VALUES (1, 'c0', ?, 'NaN in lora_A', 1.0)", ("0" * 64,))
    store = Store(path)
    store.create_run(RUN, [], None)
    for name in ("c1", "c2"):
        store.add_client(client(name, name))
        store.add_submission(submission(1, name, name[-1] * 64))
    store.exclude_submissions(1, 1, {"c1": "NaN in lora_B"}, abandon=False, now=2.0)
    store.exclude_submissions(1, 1, {"c2": "no single update is at fault"}, abandon=True, now=3.0, blameless=True)
    assert store.blamed(1) == {("c0", "0" * 64): "NaN in lora_A", ("c1", "1" * 64): "NaN in lora_B"}
    assert [c for c, _, _ in store.exclusions(1)] == ["c0", "c1", "c2"]  # the history lists all three
    store.close()


def test_a_blameless_exclusion_is_granted_once_then_the_same_update_is_blamed(tmp_path):
    """A round whose aggregation fails whatever its updates must not retrain and fail forever."""
    store = Store(tmp_path / "state.db")
    store.create_run(RUN, [], None)
    store.add_client(client("c1", "c1"))
    for attempt in (1, 2):
        store.add_submission(submission(1, "c1", "1" * 64))
        store.exclude_submissions(1, attempt, {"c1": "no single update is at fault"}, abandon=True, now=float(attempt),
                                  blameless=True)
        blamed = store.blamed(1)
        assert (("c1", "1" * 64) in blamed) is (attempt == 2)
    assert "not taken again" in blamed[("c1", "1" * 64)]
    store.close()
