"""Durable run state in SQLite: the run, its clients, rounds, accepted updates and versions.

The database is the source of truth a restarted server resumes from (DESIGN.md section 4).
Files (updates, globals, merged weights) are written atomically *before* the row that refers to
them is committed, so a committed row always points at a complete file; a crash in between
leaves at most an orphan file, which the next start removes. Each state change is one
transaction: a round's version, artifacts, history record and "done" mark commit together, so a
finished round is never redone and never half-recorded.

One connection, WAL journal, guarded by a lock so that it can be used from any one thread at a
time. Every durable commit fsyncs the WAL before it returns (what ``synchronous=FULL`` does in WAL
mode: an acknowledged upload survives power loss); the connection itself stays at
``synchronous=NORMAL``. The two writes made once per client per call on the event loop,
``add_client`` and ``add_submission``, are one autocommitted INSERT each, without their fsync (a
WAL write into the OS's cache, visible at once and surviving a crash of the process); the caller
makes them durable with ``sync`` in a worker thread before it acknowledges them. On the loop
every SQLite statement counts: each hands the GIL back and waits to take it again behind the
worker threads (under 1,000 clients, the mode switches that FULL needed around each of these
writes and their BEGIN and COMMIT were about 10% of the loop's busy time).
Because the WAL is appended in order, a later durable commit also makes every earlier one
durable, so a power loss can only drop a suffix of not-yet-acknowledged writes. (An fsync on the
loop waits for the disk's journal behind every upload written meanwhile: seconds under load.) The two reads that every
upload or download makes on the event loop (``exclusions``, ``artifact``) are answered from memory
once read; any write through this store empties that memory, so it never disagrees with the file.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from flora.server.rounds import Round, RoundState

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_id TEXT NOT NULL, base_model TEXT NOT NULL, base_model_hash TEXT NOT NULL,
    method TEXT NOT NULL, target_modules TEXT NOT NULL, settings TEXT NOT NULL,
    version INTEGER NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
    rank INTEGER NOT NULL, alpha REAL NOT NULL, scaling_rule INTEGER NOT NULL,
    num_examples INTEGER NOT NULL, device TEXT NOT NULL, software_version TEXT NOT NULL,
    joined REAL NOT NULL, left INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, state TEXT NOT NULL, selected TEXT NOT NULL,
    deadline REAL NOT NULL, quorum INTEGER NOT NULL, population INTEGER NOT NULL DEFAULT 0,
    sampled INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (round, attempt)
);
CREATE TABLE IF NOT EXISTS submissions (
    round INTEGER NOT NULL, client_id TEXT NOT NULL REFERENCES clients(id), sha256 TEXT NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL, rank INTEGER NOT NULL, alpha REAL NOT NULL,
    scaling_rule INTEGER NOT NULL, num_examples INTEGER NOT NULL, base_version INTEGER NOT NULL,
    train_loss REAL, validation_loss REAL, steps INTEGER NOT NULL, train_seconds REAL NOT NULL,
    received REAL NOT NULL, PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS artifacts (
    kind TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, PRIMARY KEY (kind, version)
);
CREATE TABLE IF NOT EXISTS exclusions (
    round INTEGER NOT NULL, client_id TEXT NOT NULL, sha256 TEXT NOT NULL, reason TEXT NOT NULL,
    excluded REAL NOT NULL, blameless INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (round, client_id, sha256)
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, created REAL NOT NULL, record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS live_settings (
    name TEXT PRIMARY KEY, value TEXT NOT NULL, changed REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS traffic (
    round INTEGER PRIMARY KEY, bytes_out INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    name TEXT PRIMARY KEY, client_id TEXT NOT NULL, token_sha256 TEXT NOT NULL, cert_sha256 TEXT NOT NULL,
    reason TEXT NOT NULL, revoked REAL NOT NULL
);
"""


@dataclass(frozen=True)
class RunRecord:
    """The run a state directory holds; fixed when the run is created."""

    run_id: str
    base_model: str
    base_model_hash: str
    method: str
    target_modules: list[str]
    settings: dict[str, Any]  # the run-defining settings, to refuse a conflicting restart
    version: int
    created: float


@dataclass(frozen=True)
class ClientRecord:
    """A client that joined, with the capabilities of its latest Join."""

    id: str
    name: str
    token_sha256: str
    rank: int
    alpha: float
    scaling_rule: int
    num_examples: int
    device: str
    software_version: str
    joined: float
    left: bool = False


@dataclass(frozen=True)
class Revocation:
    """A client the operator removed: its name, token and certificate are refused for good."""

    name: str
    client_id: str  # empty for a provisioned client that never joined
    token_sha256: str
    cert_sha256: str
    reason: str
    revoked: float


@dataclass(frozen=True)
class Submission:
    """An accepted update: the header fields it came with and where its payload lies."""

    round: int
    client_id: str
    sha256: str
    path: str
    size: int
    rank: int
    alpha: float
    scaling_rule: int
    num_examples: int
    base_version: int
    train_loss: float | None
    validation_loss: float | None
    steps: int
    train_seconds: float
    received: float


@dataclass(frozen=True)
class Artifact:
    """A file the server serves: a global adapter/LoRA or merged weights of one version."""

    kind: str  # "global" (the downlink), "merged", "remainder" or "lora" (the method's global LoRA)
    version: int
    path: str
    sha256: str
    size: int


def _columns(cls: type) -> str:
    return ", ".join(f.name for f in fields(cls))


def _placeholders(cls: type) -> str:
    return ", ".join("?" for _ in fields(cls))


class Store:
    """The SQLite database of one state directory."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self._wal_lock = threading.Lock()  # the WAL descriptor's fsync and close; never held with the disk inside _lock
        self._closed = False
        self._cache: dict[tuple, Any] = {}  # read results kept until the next write
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._wal = Path(f"{path}-wal")
        self._wal_fd: int | None = None
        journal = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        # Durable commits fsync the WAL themselves; a filesystem without WAL keeps SQLite's own fsyncs.
        self._db.execute("PRAGMA synchronous=NORMAL" if journal == "wal" else "PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Columns added since a state directory was created (a no-op, and no write, once present)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(exclusions)")}
        if "blameless" not in columns:
            self._db.execute("ALTER TABLE exclusions ADD COLUMN blameless INTEGER NOT NULL DEFAULT 0")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(rounds)")}
        for name in ("population", "sampled"):  # the privacy accountant's sample of each attempt
            if name not in columns:
                self._db.execute(f"ALTER TABLE rounds ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close (idempotent).

        A checkpoint that fails (a full disk) loses nothing: the WAL holds every commit and the
        next start replays it; the connection is closed all the same.
        """
        with self._lock:
            if self._closed:
                return
            try:
                self._checkpoint()
            except sqlite3.Error as err:
                log.warning("the database log was not folded into the database (%s); the next start does it", err)
            self._db.close()
            self._closed = True
            wal_fd, self._wal_fd = self._wal_fd, None
        if wal_fd is not None:
            with self._wal_lock:  # after a sync in progress, outside _lock (sync takes _wal_lock, then _lock)
                os.close(wal_fd)

    def _checkpoint(self) -> None:
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements as one durable transaction: on disk when the block exits."""
        with self._lock:
            self._cache.clear()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                self._cache.clear()  # committed or not: the next read asks the database
        # The fsync outside the lock: the event loop's quick inserts need the lock, not the disk.
        self.sync()

    def _write_quick(self, sql: str, row: tuple) -> None:
        """One INSERT (or its undo, a DELETE) as its own transaction (autocommit), without its fsync:
        the caller ``sync``s before it acknowledges. One statement, not BEGIN, INSERT and COMMIT: each statement run on
        the event loop hands the GIL back and waits to take it again."""
        with self._lock:
            try:
                self._db.execute(sql, row)
            finally:
                self._cache.clear()  # inserted or not: the next read asks the database

    def sync(self) -> None:
        """Make every commit so far durable: fsync the WAL (blocking: run it in a thread).

        What ``add_client`` and ``add_submission`` leave to their caller before it replies.
        """
        with self._wal_lock:  # close() waits: the descriptor is never closed (or its number reused) under an fsync
            fd = self._wal_descriptor()
            if fd is not None:  # None: no WAL; everything is checkpointed into the database file, which SQLite synced
                os.fsync(fd)

    def _wal_descriptor(self) -> int | None:
        """The WAL, opened once and kept: a durable commit never needs a new descriptor (the
        process may be out of them), and SQLite never replaces the WAL while it is connected."""
        with self._lock:
            if self._wal_fd is None and not self._closed:
                try:
                    self._wal_fd = os.open(self._wal, os.O_RDONLY)
                except FileNotFoundError:
                    return None
            return self._wal_fd

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _cached_query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """``_query`` answered from memory until the next write (each one a syscall less on the loop)."""
        key = (sql, tuple(args))
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._query(sql, args)
            return list(self._cache[key])

    # --- run ------------------------------------------------------------------------------

    def run(self) -> RunRecord | None:
        """The stored run, or None for a fresh state directory."""
        rows = self._query(f"SELECT {_columns(RunRecord)} FROM run WHERE id = 1")
        if not rows:
            return None
        run_id, model, digest, method, modules, settings, version, created = rows[0]
        return RunRecord(run_id, model, digest, method, json.loads(modules), json.loads(settings), version, created)

    def create_run(self, run: RunRecord, artifacts: Sequence[Artifact], record: dict[str, Any] | None) -> None:
        """Store a new run with its version-0 artifacts (and version-0 history record, if any)."""
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO run (id, {_columns(RunRecord)}) VALUES (1, {_placeholders(RunRecord)})",
                (run.run_id, run.base_model, run.base_model_hash, run.method,
                 json.dumps(run.target_modules), json.dumps(run.settings, sort_keys=True), run.version, run.created),
            )
            self._insert_artifacts(db, artifacts)
            if record is not None:
                db.execute("INSERT INTO versions VALUES (?, ?, ?)", (0, run.created, json.dumps(record)))

    # --- clients --------------------------------------------------------------------------

    def clients(self) -> list[ClientRecord]:
        """Every client that ever joined, in join order."""
        rows = self._query(f"SELECT {_columns(ClientRecord)} FROM clients ORDER BY joined, id")
        return [ClientRecord(*row[:-1], left=bool(row[-1])) for row in rows]

    def add_client(self, client: ClientRecord) -> None:
        """Register a new client (name and token hash are unique); durable once ``sync`` returns."""
        self._write_quick(f"INSERT INTO clients ({_columns(ClientRecord)}) VALUES ({_placeholders(ClientRecord)})",
                           astuple(client))

    def forget_client(self, client_id: str) -> None:
        """Delete a client whose Join was never acknowledged (its row could not be made durable).

        Never raises: it is the undo of a failed write, and the failure being reported matters
        more; a row it cannot delete is logged (a later Join of the name finds it taken).
        """
        try:
            self._write_quick("DELETE FROM clients WHERE id = ?", (client_id,))
        except Exception:  # noqa: BLE001
            log.exception("client %s: the row of a Join that failed could not be deleted", client_id)

    def rejoin_client(self, client: ClientRecord) -> None:
        """Update a returning client's capabilities and clear its ``left`` mark."""
        with self._transaction() as db:
            db.execute(
                "UPDATE clients SET rank = ?, alpha = ?, scaling_rule = ?, num_examples = ?, device = ?, "
                "software_version = ?, left = 0 WHERE id = ?",
                (client.rank, client.alpha, client.scaling_rule, client.num_examples, client.device,
                 client.software_version, client.id),
            )

    def set_left(self, client_id: str) -> None:
        """Mark a client as having left the run."""
        with self._transaction() as db:
            db.execute("UPDATE clients SET left = 1 WHERE id = ?", (client_id,))

    def revoke_client(self, revocation: Revocation) -> None:
        """Record a removal and mark the client as left, in one transaction."""
        with self._transaction() as db:
            db.execute(f"INSERT INTO revocations ({_columns(Revocation)}) VALUES ({_placeholders(Revocation)})",
                       astuple(revocation))
            db.execute("UPDATE clients SET left = 1 WHERE id = ?", (revocation.client_id,))

    def readmit_client(self, name: str) -> None:
        """Forget a removal: the name, its token and certificate are accepted again."""
        with self._transaction() as db:
            db.execute("DELETE FROM revocations WHERE name = ?", (name,))

    def revocations(self) -> list[Revocation]:
        """Every client the operator removed, oldest first."""
        return [Revocation(*row) for row in self._query(f"SELECT {_columns(Revocation)} FROM revocations ORDER BY revoked")]

    # --- rounds ---------------------------------------------------------------------------

    def save_attempt(self, current: Round) -> None:
        """Insert or update the row of the round's current attempt."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds (round, attempt, state, selected, deadline, quorum, population, sampled) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (current.number, current.attempt, current.state.value, json.dumps(sorted(current.selected)),
                 current.deadline, current.quorum, current.population, current.sampled),
            )

    def set_attempt_state(self, number: int, attempt: int, state: RoundState) -> None:
        """Move one attempt of a round to a new state."""
        with self._transaction() as db:
            db.execute("UPDATE rounds SET state = ? WHERE round = ? AND attempt = ?", (state.value, number, attempt))

    def load_round(self, number: int) -> Round:
        """The round as stored: its latest attempt (if any) and its accepted updates."""
        rows = self._query(
            "SELECT attempt, state, selected, deadline, quorum, population, sampled FROM rounds WHERE round = ? "
            "ORDER BY attempt DESC LIMIT 1",
            (number,),
        )
        accepted = {s.client_id: s.sha256 for s in self.submissions(number)}
        if not rows:
            return Round(number, accepted=accepted)
        attempt, state, selected, deadline, quorum, population, sampled = rows[0]
        return Round(number, attempt, RoundState(state), frozenset(json.loads(selected)), deadline, quorum, accepted,
                     population=population, sampled=sampled)

    # --- submissions ----------------------------------------------------------------------

    def add_submission(self, submission: Submission) -> None:
        """Record an accepted update (its file is already in place); durable once ``sync`` returns."""
        self._write_quick(f"INSERT INTO submissions ({_columns(Submission)}) VALUES ({_placeholders(Submission)})",
                           astuple(submission))

    def submissions(self, number: int) -> list[Submission]:
        """The accepted updates of a round, ordered by client id (the aggregation order)."""
        rows = self._query(f"SELECT {_columns(Submission)} FROM submissions WHERE round = ? ORDER BY client_id", (number,))
        return [Submission(*row) for row in rows]

    def submission(self, number: int, client_id: str) -> Submission | None:
        """One client's accepted update of a round, if any."""
        rows = self._query(
            f"SELECT {_columns(Submission)} FROM submissions WHERE round = ? AND client_id = ?", (number, client_id)
        )
        return Submission(*rows[0]) if rows else None

    def exclude_submissions(
        self, number: int, attempt: int, reasons: dict[str, str], abandon: bool, now: float, blameless: bool = False
    ) -> list[Submission]:
        """Take updates that made the round's aggregation fail out of it, keeping why (one transaction).

        With ``abandon`` the attempt is marked abandoned too (nothing aggregable is left), so a
        restart reopens the round instead of aggregating it again. ``blameless``: no update failed
        on its own, so none is refused if it comes again (``blamed``); but only once: an update
        already excluded blamelessly in this round that fails again is blamed, so a round whose
        aggregation fails whatever its updates cannot loop through retrained rounds forever.
        Returns the removed rows, whose files the caller deletes once this has committed.
        """
        removed = [s for s in self.submissions(number) if s.client_id in reasons]
        excused = set(self._query("SELECT client_id, sha256 FROM exclusions WHERE round = ? AND blameless = 1", (number,)))
        with self._transaction() as db:
            for sub in removed:
                again = (sub.client_id, sub.sha256) in excused
                reason = reasons[sub.client_id] + ("; it failed the same way before, so it is not taken again" if again and blameless else "")
                db.execute("DELETE FROM submissions WHERE round = ? AND client_id = ?", (number, sub.client_id))
                db.execute("INSERT OR REPLACE INTO exclusions VALUES (?, ?, ?, ?, ?, ?)",
                           (number, sub.client_id, sub.sha256, reason, now, int(blameless and not again)))
            if abandon:
                db.execute("UPDATE rounds SET state = ? WHERE round = ? AND attempt = ?",
                           (RoundState.ABANDONED.value, number, attempt))
        return removed

    def exclusions(self, number: int) -> list[tuple[str, str, str]]:
        """(client id, sha256, reason) of every update taken out of a round's aggregation."""
        return self._cached_query(
            "SELECT client_id, sha256, reason FROM exclusions WHERE round = ? ORDER BY excluded, client_id", (number,))

    def blamed(self, number: int) -> dict[tuple[str, str], str]:
        """Why each update of a round, by (client id, sha256), was excluded for failing on its own."""
        rows = self._cached_query(
            "SELECT client_id, sha256, reason FROM exclusions WHERE round = ? AND blameless = 0", (number,))
        return {(client, sha256): reason for client, sha256, reason in rows}

    def last_submitted_rounds(self) -> dict[str, int]:
        """Per client, the last round it has an accepted update for."""
        return dict(self._query("SELECT client_id, MAX(round) FROM submissions GROUP BY client_id"))

    def add_bytes_out(self, number: int, sent: int) -> None:
        """Count ``sent`` FetchGlobal bytes toward round ``number``'s history line. Without an fsync of
        its own: a killed process keeps it (the OS has the write), the next durable commit syncs it."""
        self._write_quick("INSERT INTO traffic VALUES (?, ?) ON CONFLICT(round) DO UPDATE SET "
                          "bytes_out = bytes_out + excluded.bytes_out", (number, sent))

    def bytes_out(self, number: int) -> int:
        """The FetchGlobal bytes counted toward round ``number`` so far (restored after a restart)."""
        rows = self._query("SELECT bytes_out FROM traffic WHERE round = ?", (number,))
        return rows[0][0] if rows else 0

    def submitted_bytes(self) -> dict[str, int]:
        """Per client, the bytes of every update accepted from it."""
        return dict(self._query("SELECT client_id, SUM(size) FROM submissions GROUP BY client_id"))

    def update_paths(self) -> set[str]:
        """Stored paths of every accepted update (to tell orphans from records)."""
        return {row[0] for row in self._query("SELECT path FROM submissions")}

    # --- versions -------------------------------------------------------------------------

    def commit_version(
        self, number: int, attempt: int, artifacts: Sequence[Artifact], record: dict[str, Any], now: float
    ) -> None:
        """Commit a round's result at once: artifacts, history record, round done, run version."""
        with self._transaction() as db:
            (version,) = db.execute("SELECT version FROM run WHERE id = 1").fetchone()
            if version != number - 1:
                raise RuntimeError(f"cannot commit round {number}: the run is at version {version}")
            self._insert_artifacts(db, artifacts)
            # Only the latest merged weights are served (MERGED_MODULES is for the latest version).
            db.execute("DELETE FROM artifacts WHERE kind = 'merged' AND version < ?", (number,))
            db.execute("INSERT INTO versions VALUES (?, ?, ?)", (number, now, json.dumps(record)))
            db.execute("UPDATE rounds SET state = ? WHERE round = ? AND attempt = ?", (RoundState.DONE.value, number, attempt))
            db.execute("UPDATE run SET version = ? WHERE id = 1", (number,))

    def replace_artifacts(self, artifacts: Sequence[Artifact]) -> None:
        """Point existing artifact rows at new files, all in one transaction (state upgrades)."""
        with self._transaction() as db:
            self._insert_artifacts(db, artifacts)

    @staticmethod
    def _insert_artifacts(db: sqlite3.Connection, artifacts: Sequence[Artifact]) -> None:
        db.executemany(f"INSERT OR REPLACE INTO artifacts VALUES ({_placeholders(Artifact)})", [astuple(a) for a in artifacts])

    def artifact(self, kind: str, version: int) -> Artifact | None:
        """A served file of a version, if recorded."""
        rows = self._cached_query(f"SELECT {_columns(Artifact)} FROM artifacts WHERE kind = ? AND version = ?",
                                  (kind, version))
        return Artifact(*rows[0]) if rows else None

    def artifacts(self, kind: str) -> list[Artifact]:
        """Every recorded file of one kind, by version."""
        rows = self._query(f"SELECT {_columns(Artifact)} FROM artifacts WHERE kind = ? ORDER BY version", (kind,))
        return [Artifact(*row) for row in rows]

    def artifact_paths(self) -> set[str]:
        """Stored paths of every recorded artifact (to tell orphans from records)."""
        return {row[0] for row in self._query("SELECT path FROM artifacts")}

    def recent_history(self, limit: int) -> list[dict[str, Any]]:
        """The history records of the latest ``limit`` versions, oldest first."""
        rows = self._query("SELECT record FROM versions ORDER BY version DESC LIMIT ?", (limit,))
        return [json.loads(row[0]) for row in reversed(rows)]

    def history(self) -> list[dict[str, Any]]:
        """The history records of every committed version, in order."""
        return [json.loads(row[0]) for row in self._query("SELECT record FROM versions ORDER BY version")]

    # --- live settings ----------------------------------------------------------------------

    def save_live_settings(self, values: dict[str, str], now: float) -> None:
        """Keep round settings an operator changed while the run went on (a restart applies them)."""
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO live_settings VALUES (?, ?, ?)",
                           [(name, value, now) for name, value in values.items()])

    def live_settings(self) -> dict[str, str]:
        """The round settings an operator changed, by name (empty when none)."""
        return dict(self._query("SELECT name, value FROM live_settings"))

    def add_exclusion(self, number: int, client_id: str, sha256: str, reason: str, now: float) -> None:
        """Record an update refused from a round for its history (a duplicate payload); durable once ``sync`` returns."""
        self._write_quick("INSERT OR REPLACE INTO exclusions (round, client_id, sha256, reason, excluded) "
                          "VALUES (?, ?, ?, ?, ?)", (number, client_id, sha256, reason, now))
