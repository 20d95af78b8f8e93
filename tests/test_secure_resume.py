"""A server killed at each step of a secure round resumes the same attempt (no client retrains).

Two secure rounds of three real clients, during which the real server SIGKILLs itself at each
point in turn (tests/secure_kill/sitecustomize.py), each step once. In round 1: once two keys
are advertised, when the share step opens (what opens a step is saved), after one masked input
of pass 1, one reveal of unmask 1, one masked input of pass 2 and one reveal of unmask 2 (an
answer is saved before it is acknowledged). Then, in round 2 (round 1 has no share step left by
then), once its first share is saved: the run goes on past a resumed round and resumes the next
one too. Each time the server is restarted on the same state
directory and port. Each round must commit on its first attempt, each client must have trained
and advertised once per round, every client must end holding the server's model, and each
round's change must be plain stacking's of what the clients trained (tests/secfaults dumps it)
to float round-off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client_harness import ServerView
from harness import server_factory  # noqa: F401 - a pytest fixture
from secure_processes import attempt_key, committed_change, hooked_env, relative_error, stacked, start_hooked, trained
from test_client_integration import FINISH_S, RUN_FLAGS, assert_clients_hold_the_servers_model, finish

pytestmark = pytest.mark.slow

INJECTOR = Path(__file__).parent / "secure_kill"
RANKS = {"r4": 4, "r2": 2, "r1": 1}
ROUNDS = 2
FLAGS = (*RUN_FLAGS, "--rounds", str(ROUNDS), "--min-clients", "3", "--secure-aggregation")
ROUND_1_KILLS = ("advertise:2", "share:0", "mask1:1", "unmask1:1", "mask2:1", "unmask2:1")
KILLS = (*ROUND_1_KILLS, "share:1")  # the last server started in round 1 kills itself in round 2's share step


@pytest.mark.timeout(900)  # 8 server starts: a minute or two on an idle 2-core machine, more under load
def test_a_server_killed_at_each_secure_step_resumes_the_same_attempt_and_merges_the_plain_model(
        tmp_path, server_factory):  # noqa: F811
    state, dump = tmp_path / "state", tmp_path / "dump"
    dump.mkdir()
    server = server_factory(*FLAGS, state_dir=state, env={"PYTHONPATH": str(INJECTOR), "FLORA_TEST_SECURE_KILL": KILLS[0]})
    port = server.port
    clients = [start_hooked(tmp_path, server.address, name, rank, 10 * i, hooked_env(dump))
               for i, (name, rank) in enumerate(RANKS.items())]
    outputs = []
    for point in (*KILLS[1:], None):
        # A bound, never a timing assertion: the first kill waits for four processes to start and three to train.
        assert server.process.wait(2 * FINISH_S) == -9, f"the server did not kill itself; its output:\n{server.output()}"
        outputs.append(server.output())
        env = {"PYTHONPATH": str(INJECTOR), "FLORA_TEST_SECURE_KILL": point} if point else None
        server = server_factory(*FLAGS, "--port", str(port), state_dir=state, env=env)
    finish(clients)
    shapes = assert_clients_hold_the_servers_model(tmp_path, server.address, clients, ROUNDS)
    view = ServerView(server.address, clients[0].identity().token)
    try:
        status = view.status()
    finally:
        view.close()
    outputs.append(server.output())

    records = [r for r in map(json.loads, (state / "history.jsonl").read_text().splitlines()) if r["round"] > 0]
    assert [(r["round"], r["secure_aggregation"], r["attempts"], r["secure"]["survivors"]) for r in records] == [
        (number, True, 1, 3) for number in range(1, ROUNDS + 1)]
    for client in clients:  # trained once, advertised once per round: no attempt was started over
        log = client.log()
        for number in range(1, ROUNDS + 1):
            assert log.count(f"event=train_start round={number}") == 1, log
            assert log.count(f"event=advertised round={number}") == 1, log
    # Every restart after round 1's keys were all in took its attempt up (the first came before: two keys in);
    # the restart after the kill in round 2 took round 2's.
    round_1 = [o for o in outputs[1:len(ROUND_1_KILLS) + 1] if "round 1 attempt 1: resuming secure aggregation" in o]
    assert len(round_1) == len(ROUND_1_KILLS) - 1, outputs
    assert "round 2 attempt 1: resuming secure aggregation" in outputs[-1], outputs[-1]
    assert not any("cannot be trusted" in o or "starts over" in o for o in outputs), outputs

    run_id, clip = status.run.run_id, status.run.secure_clip_norm
    for number in range(1, ROUNDS + 1):
        key = attempt_key(run_id, number, 1)
        want = stacked([trained(dump, name, key) for name in RANKS], clip)
        assert relative_error(committed_change(state, number, shapes), want) < 1e-5, number
