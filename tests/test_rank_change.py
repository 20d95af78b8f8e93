"""A client changes its rank: the change takes effect from the next round that selects it.

Against the real server, with scripted clients: a rejoin with another rank while selected in
the open round is accepted, takes the client out of that round (its update made before the
change is refused, the round does not wait for it), and the next round trains and aggregates it
at the new rank; Leave and a Join with another rank works the same way (protos/PROTOCOL.md,
"Identity")."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from harness import OPERATOR_TOKEN, ScriptedClient, make_update, running_server

pytestmark = pytest.mark.slow


def test_a_rank_change_takes_effect_from_the_next_round_and_the_run_goes_on(tmp_path):
    flags = ("--min-clients", "2", "--rounds", "3", "--checkpoint-every", "0", "--operator-token", OPERATOR_TOKEN,
             "--long-poll-s", "0.5")
    with running_server(tmp_path / "state", *flags) as server:
        operator = ScriptedClient(server.address, "op", token=OPERATOR_TOKEN)
        base = operator.status().run.base_model_hash
        alice, bob = ScriptedClient(server.address, "alice", rank=4), ScriptedClient(server.address, "bob", rank=2)
        alice.join(base)
        bob.join(base)
        assert alice.wait_for_train().round == 1
        stale = make_update(alice.adapter(1), alice.alpha, 1)  # trained at rank 4 before the change

        wider = ScriptedClient(server.address, "alice", rank=8, alpha=16.0)
        assert wider.join(base, token=alice.token).client_id == alice.client_id  # accepted, same identity
        assert set(operator.status().round.selected) == {bob.client_id}
        assert wider.next_task().WhichOneof("kind") == "wait"
        with pytest.raises(grpc.RpcError) as refused:
            alice.submit(stale, 1)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rank 8 declared at Join" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:  # at the new rank: still not in a round opened before the change
            wider.submit(make_update(wider.adapter(1), wider.alpha, 1), 1)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not selected" in refused.value.details()
        assert bob.submit(make_update(bob.adapter(2), bob.alpha, 1), 1).accepted  # round 1 closes without alice
        operator.wait_for_version(1)

        assert wider.wait_for_train().round == 2
        assert wider.submit(make_update(wider.adapter(3), wider.alpha, 2), 2).accepted  # at rank 8 now
        bob.wait_for_train()
        assert bob.submit(make_update(bob.adapter(4), bob.alpha, 2), 2).accepted
        operator.wait_for_version(2)

        assert bob.wait_for_train().round == 3  # Leave, then a Join with another rank: the same rule
        bob.stub.Leave(bob_leave(), metadata=bob.metadata(), timeout=10)
        narrower = ScriptedClient(server.address, "bob", rank=1, alpha=2.0)
        assert narrower.join(base, token=bob.token).client_id == bob.client_id
        wider.wait_for_train()
        assert wider.submit(make_update(wider.adapter(5), wider.alpha, 3), 3).accepted
        final = operator.wait_for_version(3)
        assert final.state == "finished"
    history = [json.loads(line) for line in (Path(server.state_dir) / "history.jsonl").read_text().splitlines()]
    ranks = {h["round"]: {c["name"]: c["rank"] for c in h["clients"]} for h in history if h["round"] > 0}
    assert ranks == {1: {"bob": 2}, 2: {"alice": 8, "bob": 2}, 3: {"alice": 8}}
    assert "changed rank 4 -> 8" in server.output()


def bob_leave():
    from flora.v1 import coordinator_pb2

    return coordinator_pb2.LeaveRequest(reason="restarting with another rank")
