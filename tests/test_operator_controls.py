"""An operator's controls on a real server (issue 28): a stalled round says why and its settings
change live (and stay changed across a restart); Status shows a client only itself; the run spec
carries the update limits; one payload counts once a round; a removal reaches the client registry
and lasts until the operator re-admits the client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from flora.server.admin import console
from flora.server.admin.cli import main as admin
from flora.server.auth import token_digest
from flora.server.registry import Provisioned, read_registry, render_registry
from flora.v1 import coordinator_pb2 as pb
from harness import OPERATOR_TOKEN, ScriptedClient, make_update, running_server, sha256

pytestmark = pytest.mark.slow

FAST = ("--operator-token", OPERATOR_TOKEN, "--long-poll-s", "0.5", "--client-timeout-s", "600")


def operator(server) -> ScriptedClient:
    return ScriptedClient(server.address, "operator", token=OPERATOR_TOKEN)


def wait_for(condition, what: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def settings(server, *changes: str) -> int:
    """``flora-admin settings`` against ``server``, with ``--set`` for each change."""
    sets = [part for change in changes for part in ("--set", change)]
    return admin(["settings", "--server", server.address, "--token", OPERATOR_TOKEN, *sets])


def test_a_round_short_of_clients_says_so_and_an_operator_changes_min_clients_live(tmp_path, capsys):
    flags = ("--min-clients", "3", "--rounds", "2", *FAST)
    with running_server(tmp_path / "state", *flags) as server:
        view = operator(server)
        base = view.status().run.base_model_hash
        clients = [ScriptedClient(server.address, name) for name in ("alice", "bob")]
        for client in clients:
            client.join(base)
        status = wait_for(lambda: (s := view.status()).round.available_clients == 2 and s, "two available clients")
        assert (status.round.state, status.round.min_clients) == ("waiting", 3)
        assert "round 1 waiting: needs 3 connected clients, has 2" in console.headline(status, time.time())
        wait_for(lambda: "needs 3 connected clients, has 2" in clients[0].next_task().wait.reason, "the WAIT reason")
        wait_for(lambda: "round 1 waiting: needs 3 connected clients, has 2" in server.output(), "the log line")

        # Checked by the configuration's own limits, all or nothing; only round settings change.
        capsys.readouterr()
        assert settings(server, "min_clients=0") == 1
        assert "min_clients" in (err := capsys.readouterr().err) and "greater than or equal to 1" in err
        assert settings(server, "seed=3") == 1
        assert "not a setting that may change" in capsys.readouterr().err
        assert settings(server, "min_clients=2", "quorum=7") == 1
        assert settings(server, "rounds=0") == 1
        assert view.status().round.min_clients == 3

        changed_at = time.time()
        assert settings(server, "min_clients=2", "round_deadline_s=120") == 0
        assert "min_clients 3 -> 2" in capsys.readouterr().out
        assert clients[0].wait_for_train().round == 1
        assert "the operator changed the round settings: min_clients 3 -> 2, round_deadline_s 600.0 -> 120.0" in server.output()
        deadline = view.status().round.deadline_unix_ms / 1000  # the round opened after the change, with 120 s
        assert changed_at + 120 - 0.01 <= deadline <= time.time() + 120
    for client in clients:
        client.close()

    with running_server(tmp_path / "state", *flags) as server:  # the change is the run's, not the process's
        capsys.readouterr()
        assert settings(server) == 0
        shown = capsys.readouterr().out
        assert "| min_clients " in shown and "| 2 " in shown.split("min_clients", 1)[1].splitlines()[0]
        assert "keeping the round settings an operator changed" in server.output()
        assert operator(server).status().round.min_clients == 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A flora run with two clients of the same LoRA shape; round 1 open for both."""
    flags = ("--min-clients", "2", "--rounds", "1", "--max-update-norm", "1000", "--max-weight-share", "0.6",
             "--clip-norm", "50", "--max-rank", "64", *FAST)
    with running_server(tmp_path_factory.mktemp("pair") / "state", *flags) as server:
        base = operator(server).status().run.base_model_hash
        alice, bob = ScriptedClient(server.address, "alice"), ScriptedClient(server.address, "bob")
        alice.join(base)
        bob.join(base)
        alice.wait_for_train()
        yield server, alice, bob
        alice.close()
        bob.close()


def test_a_client_sees_only_itself_and_the_runs_counts(pair):
    server, alice, bob = pair
    full = operator(server).status()
    assert sorted(c.client_name for c in full.clients) == ["alice", "bob"]
    assert sorted(full.round.selected) == sorted([alice.client_id, bob.client_id])
    own = bob.status()
    assert [c.client_name for c in own.clients] == ["bob"]
    assert list(own.round.selected) == [bob.client_id] and alice.client_id not in str(own)
    assert (own.num_clients, own.round.num_selected, own.round.num_submitted) == (2, 2, 0)


def test_the_run_spec_carries_the_limits_an_update_must_respect(pair):
    _, alice, _ = pair
    spec = alice.spec
    assert (spec.max_rank, spec.max_update_norm, spec.max_weight_share, spec.clip_norm) == (64, 1000.0, 0.6, 50.0)
    assert (spec.clip_median_multiple, spec.reject_median_multiple) == (0.0, 0.0)


def test_the_same_bytes_from_a_second_client_are_refused_recorded_and_not_asked_again(pair):
    server, alice, bob = pair
    payload = make_update(alice.adapter(seed=1), alice.alpha, 1)
    assert alice.submit(payload, 1).accepted
    with pytest.raises(grpc.RpcError) as copied:
        bob.submit(payload, 1)
    assert copied.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "another client's accepted update has the same payload" in copied.value.details()
    # Not asked to train the round again (it would make the same bytes): the round closes without it.
    operator(server).wait_for_version(1)
    history = [json.loads(line) for line in (Path(server.state_dir) / "history.jsonl").read_text().splitlines()]
    (record,) = [r for r in history if r["round"] == 1]
    assert [c["name"] for c in record["clients"]] == ["alice"]
    (duplicate,) = record["excluded"]
    assert (duplicate["name"], duplicate["sha256"]) == ("bob", sha256(payload))
    assert "duplicate payload" in duplicate["reason"] and "alice" in duplicate["reason"]


def test_a_removal_reaches_the_registry_and_lasts_until_the_client_is_readmitted(tmp_path, capsys):
    registry = tmp_path / "clients.toml"
    tokens = {name: f"token-of-{name}-0123456789" for name in ("alice", "bob")}
    registry.write_text(render_registry([Provisioned(n, token_digest(t)) for n, t in tokens.items()]))
    flags = ("--client-registry", str(registry), "--min-clients", "2", *FAST)
    operator_flags = ["--token", OPERATOR_TOKEN]
    with running_server(tmp_path / "run1", *flags) as server:
        base = operator(server).status().run.base_model_hash
        bob = ScriptedClient(server.address, "bob")
        bob.join(base, token=tokens["bob"])
        assert admin(["clients", "--server", server.address, *operator_flags, "remove", "bob", "--reason", "leaked kit"]) == 0
        assert "now says so for later runs" in capsys.readouterr().out
        with pytest.raises(grpc.RpcError) as refused:
            bob.next_task()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "removed by the operator: leaked kit" in refused.value.details()
        bob.close()
    assert read_registry(registry)["bob"].removed == "leaked kit"

    with running_server(tmp_path / "run2", *flags) as server:  # a later run on the same registry
        base = operator(server).status().run.base_model_hash
        bob = ScriptedClient(server.address, "bob")
        with pytest.raises(grpc.RpcError) as refused:
            bob.join(base, token=tokens["bob"])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "removed by the operator: leaked kit" in refused.value.details()
        view = operator(server)
        listed = {c.client_name: c.state for c in view.stub.ListClients(
            pb.ListClientsRequest(), metadata=view.metadata(), timeout=10).clients}
        assert listed == {"alice": "provisioned", "bob": "removed"}
        assert admin(["clients", "--server", server.address, *operator_flags, "readmit", "bob"]) == 0
        assert "re-admitted" in capsys.readouterr().out
        assert read_registry(registry)["bob"].removed is None
        assert bob.join(base, token=tokens["bob"]).client_token == tokens["bob"]
        bob.close()
