"""A server killed at each step of a secure round resumes the same attempt (no client retrains).

One secure round of three real clients, during which the real server SIGKILLs itself at each
point in turn (tests/secure_kill/sitecustomize.py): once two keys are advertised, when the share
step opens, when masked pass 1 opens, after one masked input of pass 1, one reveal of unmask 1,
one masked input of pass 2 and one reveal of unmask 2. Each time it is restarted on the same
state directory and port. The round must commit on its first attempt, each client must have
trained and advertised once, and the merged model must be a plain run's (same clients, same
seeds) to float round-off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client_harness import ServerView
from harness import server_factory  # noqa: F401 - a pytest fixture
from test_client_integration import FINISH_S, RUN_FLAGS, assert_clients_hold_the_servers_model, finish, start

pytestmark = pytest.mark.slow

INJECTOR = Path(__file__).parent / "secure_kill"
RANKS = {"r4": 4, "r2": 2, "r1": 1}
FLAGS = (*RUN_FLAGS, "--rounds", "1", "--min-clients", "3")
KILLS = ("advertise:2", "share:0", "mask1:0", "mask1:1", "unmask1:1", "mask2:1", "unmask2:1")


def merged(tmp_path: Path, address: str, clients: list) -> dict[str, torch.Tensor]:
    """The server's merged target-module weights at version 1 (which every client holds too)."""
    shapes = assert_clients_hold_the_servers_model(tmp_path, address, clients, 1)
    view = ServerView(address, clients[0].identity().token)
    try:
        return view.merged_weights(tmp_path, 1, shapes)
    finally:
        view.close()


@pytest.mark.timeout(900)  # 9 server starts: about a minute on an idle 2-core machine, more under load
def test_a_server_killed_at_each_secure_step_resumes_the_same_attempt_and_merges_the_plain_model(
        tmp_path, server_factory):  # noqa: F811
    secure_dir, plain_dir = tmp_path / "secure", tmp_path / "plain"
    secure_dir.mkdir(), plain_dir.mkdir()
    state = secure_dir / "state"
    plain_server = server_factory(*FLAGS, state_dir=plain_dir / "state")  # the oracle, meanwhile
    plain_clients = [start(plain_dir, plain_server.address, name, rank) for name, rank in RANKS.items()]
    flags = (*FLAGS, "--secure-aggregation")
    server = server_factory(*flags, state_dir=state, env={"PYTHONPATH": str(INJECTOR), "FLORA_TEST_SECURE_KILL": KILLS[0]})
    port = server.port
    clients = [start(secure_dir, server.address, name, rank) for name, rank in RANKS.items()]
    outputs = []
    for point in (*KILLS[1:], None):
        # A bound, never a timing assertion: the first kill waits for six processes to start and three to train.
        assert server.process.wait(2 * FINISH_S) == -9, f"the server did not kill itself; its output:\n{server.output()}"
        outputs.append(server.output())
        env = {"PYTHONPATH": str(INJECTOR), "FLORA_TEST_SECURE_KILL": point} if point else None
        server = server_factory(*flags, "--port", str(port), state_dir=state, env=env)
    finish(clients)
    secure = merged(secure_dir, server.address, clients)
    outputs.append(server.output())

    record = next(r for r in map(json.loads, (state / "history.jsonl").read_text().splitlines()) if r["round"] == 1)
    assert record["secure_aggregation"] and record["attempts"] == 1 and record["secure"]["survivors"] == 3
    for client in clients:  # trained once, advertised once: the attempt was never started over
        log = client.log()
        assert log.count("event=train_start round=1") == 1 and log.count("event=advertised round=1") == 1, log
    resumed = [o for o in outputs[1:] if "round 1 attempt 1: resuming secure aggregation" in o]
    assert len(resumed) == len(KILLS) - 1, outputs  # every restart after the keys were all in took the attempt up
    assert not any("cannot be trusted" in o or "starts over" in o for o in outputs), outputs

    finish(plain_clients)
    plain = merged(plain_dir, plain_server.address, plain_clients)
    for name, want in plain.items():
        assert torch.allclose(secure[name], want, rtol=1e-6, atol=1e-6), name
