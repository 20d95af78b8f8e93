"""Secure aggregation end to end: a real flora-server with --secure-aggregation and real clients.

The server never receives a client's factors, only masked vectors whose sums it unmasks; the
model it merges must still be the plain run's. The oracle is the plain run itself: the same
clients (names, data, ranks, seeds) against a plain server train the same updates, so both
servers' merged models after two rounds agree to float round-off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client_harness import ServerView
from harness import server_factory  # noqa: F401 - a pytest fixture
from harness import start_server
from test_client_integration import FINISH_S, RUN_FLAGS, assert_clients_hold_the_servers_model, finish, start

pytestmark = pytest.mark.slow

RANKS = {"r8": 8, "r4": 4, "r2": 2}


def run(tmp_path: Path, server_factory, *flags: str) -> tuple[dict[str, torch.Tensor], list[dict]]:  # noqa: F811
    """Two rounds with three mixed-rank clients; the server's merged weights at version 2 and its history."""
    tmp_path.mkdir()
    server = server_factory(*RUN_FLAGS, "--rounds", "2", "--min-clients", "3", *flags, state_dir=tmp_path / "state")
    clients = [start(tmp_path, server.address, name, rank) for name, rank in RANKS.items()]
    finish(clients)
    shapes = assert_clients_hold_the_servers_model(tmp_path, server.address, clients, 2)
    view = ServerView(server.address, clients[0].identity().token)
    try:
        merged = view.merged_weights(tmp_path, 2, shapes)
        recent = list(view.status().recent_rounds)
    finally:
        view.close()
    history = [json.loads(line) for line in (tmp_path / "state" / "history.jsonl").read_text().splitlines()]
    return merged, [r for r in history if r["round"] > 0], recent


def test_secure_flora_rounds_merge_the_plain_runs_model_and_store_no_update(tmp_path, server_factory):  # noqa: F811
    secure, history, recent = run(tmp_path / "secure", server_factory, "--secure-aggregation")
    plain, plain_history, plain_recent = run(tmp_path / "plain", server_factory)
    for name, want in plain.items():
        assert torch.allclose(secure[name], want, rtol=1e-6, atol=1e-6), name
    assert [r["secure_aggregation"] for r in history] == [True, True]
    assert [r["secure_aggregation"] for r in plain_history] == [False, False]
    assert all(r["secure"]["survivors"] == 3 and r["num_clients"] == 3 for r in history)
    assert [(r.secure.survivors, r.secure.bytes_up > 0) for r in recent] == [(3, True), (3, True)]
    assert not any(r.HasField("secure") for r in plain_recent)
    # Only public keys were stored in the updates' place: no file holds a client's factors.
    stored = list((tmp_path / "secure" / "state" / "updates").rglob("*"))
    assert all(p.is_dir() or p.stat().st_size < 1024 for p in stored), stored


def test_a_server_killed_during_the_secure_steps_resumes_the_attempt_and_the_run_completes(tmp_path, server_factory):  # noqa: F811
    flags = (*RUN_FLAGS, "--rounds", "2", "--min-clients", "3", "--secure-aggregation")
    # The server SIGKILLs itself once round 1's first share is saved (tests/secure_kill): never after the round committed.
    server = server_factory(*flags, env={"PYTHONPATH": str(Path(__file__).parent / "secure_kill"),
                                         "FLORA_TEST_SECURE_KILL": "share:1"})
    clients = [start(tmp_path, server.address, name, rank) for name, rank in RANKS.items()]
    assert server.process.wait(2 * FINISH_S) == -9, server.output()
    restarted = start_server(server.state_dir, *flags, "--port", str(server.port))
    try:
        finish(clients)
        assert_clients_hold_the_servers_model(tmp_path, restarted.address, clients, 2)
    finally:
        restarted.kill()
    history = [json.loads(line) for line in (server.state_dir / "history.jsonl").read_text().splitlines()]
    first = next(r for r in history if r["round"] == 1)
    assert first["secure_aggregation"] and first["attempts"] == 1 and first["secure"]["survivors"] == 3
    assert "round 1 attempt 1: resuming secure aggregation" in restarted.output()
