"""A full disk under a real server: clear log lines, RESOURCE_EXHAUSTED to callers, nothing lost,
and the run continues once space is back (issue 11, defect 6).

The disk is filled by tests/diskfull/sitecustomize.py (ENOSPC on every fsync, SQLite's "database
or disk is full" on every transaction while a flag file exists): a tmpfs would need root.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc
import pytest

from harness import OPERATOR_TOKEN, ScriptedClient, make_update, running_server

pytestmark = pytest.mark.slow

INJECTOR = Path(__file__).parent / "diskfull"
DEADLINE_S = 6.0


def _flags(deadline_s: float) -> tuple[str, ...]:
    """A one-round run of two clients that closes when both have uploaded."""
    return ("--min-clients", "2", "--rounds", "1", "--quorum", "1.0", "--round-deadline-s", str(deadline_s),
            "--long-poll-s", "0.5", "--operator-token", OPERATOR_TOKEN, "--checkpoint-every", "0")


def _two_joined(server) -> tuple[str, ScriptedClient, ScriptedClient]:
    """The run's base model hash, and alice (rank 4) and bob (rank 2) joined."""
    base = ScriptedClient(server.address, "op", token=OPERATOR_TOKEN).status().run.base_model_hash
    alice, bob = ScriptedClient(server.address, "alice"), ScriptedClient(server.address, "bob", rank=2)
    alice.join(base)
    bob.join(base)
    return base, alice, bob


def test_a_full_disk_refuses_cleanly_and_the_run_resumes_when_space_is_back(tmp_path):
    flag = tmp_path / "disk-is-full"
    env = {"PYTHONPATH": str(INJECTOR), "FLORA_TEST_DISK_FULL": str(flag)}
    with running_server(tmp_path / "state", *_flags(DEADLINE_S), env=env) as server:
        state = Path(server.state_dir)
        base, alice, bob = _two_joined(server)
        opened = time.time()
        assert alice.wait_for_train().round == 1

        flag.touch()
        with pytest.raises(grpc.RpcError) as error:
            ScriptedClient(server.address, "carol").join(base)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk is full" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            alice.submit(make_update(alice.adapter(1), alice.alpha, 1), 1)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk is full" in error.value.details()
        assert not [p for p in (state / "updates").rglob("*") if p.is_file()] and not list((state / "tmp").iterdir())
        time.sleep(max(0.0, opened + DEADLINE_S + 2 - time.time()))  # the deadline passes while the disk is full
        output = server.output()
        # one clear line each; the upload meets the full disk at its file or at its database record
        assert re.search(r"SubmitUpdate failed: the server's (database )?disk is full", output)
        assert "Join failed" in output
        assert "could not be saved" in output  # the ticker met the full disk at the deadline, and lives on
        assert server.process.poll() is None

        flag.unlink()  # space is back
        assert alice.wait_for_train().round == 1  # a new attempt of the same round
        for client, seed in ((alice, 1), (bob, 2)):
            assert client.submit(make_update(client.adapter(seed), client.alpha, 1), 1).accepted
        status = alice.wait_for_version(1)
        assert status.global_version == 1
        record = json.loads((state / "history.jsonl").read_text().splitlines()[-1])
        assert record["attempts"] >= 2 and sorted(c["name"] for c in record["clients"]) == ["alice", "bob"]
        ScriptedClient(server.address, "carol").join(base)  # the refused Join left nothing behind: the name is free


def _wait_for_line(server, words: str, timeout_s: float = 60.0) -> str:
    """The server's output once it holds ``words`` (the test fails after ``timeout_s``)."""
    until = time.time() + timeout_s
    while words not in (output := server.output()):
        assert time.time() < until, f"the server never logged {words!r}:\n{output[-3000:]}"
        time.sleep(0.2)
    return output


def test_a_full_disk_while_aggregating_is_waited_out_with_every_update_kept(tmp_path):
    """Issue 28 items 1, 4 and 5: safetensors reports ENOSPC as a SafetensorError and torch EMFILE
    as a RuntimeError, neither an OSError: still a full disk (waited out) and out of descriptors;
    a Join whose record cannot be made durable leaves none."""
    flag, no_files = tmp_path / "artifacts-full", tmp_path / "no-files"
    env = {"PYTHONPATH": str(INJECTOR), "FLORA_TEST_ARTIFACTS_FULL": str(flag), "FLORA_TEST_NO_FILES": str(no_files)}
    with running_server(tmp_path / "state", *_flags(60), env=env) as server:
        state = Path(server.state_dir)
        base, alice, bob = _two_joined(server)
        assert alice.wait_for_train().round == 1
        no_files.touch()  # out of descriptors while the upload is validated
        with pytest.raises(grpc.RpcError) as error:
            alice.submit(make_update(alice.adapter(1), alice.alpha, 1), 1)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "file descriptors" in error.value.details()
        assert not [p for p in (state / "updates").rglob("*") if p.is_file()] and not list((state / "tmp").iterdir())
        carol = ScriptedClient(server.address, "carol")
        with pytest.raises(grpc.RpcError) as error:  # item 5: its row is written, the WAL's fsync fails
            carol.join(base)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "nothing of this request was recorded" in (
            error.value.details())
        no_files.unlink()
        carol.join(base)  # "nothing was recorded" was true: the name is free
        flag.touch()  # the disk fills before the round's artifacts are written
        for client, seed in ((alice, 1), (bob, 2)):
            assert client.submit(make_update(client.adapter(seed), client.alpha, 1), 1).accepted
        output = _wait_for_line(server, "aggregating failed (SafetensorError")
        assert "excluded" not in output and "abandoned" not in output
        assert len([p for p in (state / "updates").rglob("*") if p.is_file()]) == 2  # both updates kept

        flag.unlink()  # space is back: the same attempt aggregates
        assert alice.wait_for_version(1).global_version == 1
        record = json.loads((state / "history.jsonl").read_text().splitlines()[-1])
        assert sorted(c["name"] for c in record["clients"]) == ["alice", "bob"]
        assert record["excluded"] == [] and record["attempts"] == 1


def test_a_restart_on_a_full_disk_comes_up_serves_and_waits_for_space(tmp_path):
    """Issue 28 item 2: the start rewrote history.jsonl (ENOSPC: exit 1), then closing the database
    failed on its checkpoint (a traceback)."""
    flag = tmp_path / "disk-is-full"
    env = {"PYTHONPATH": str(INJECTOR), "FLORA_TEST_DISK_FULL": str(flag)}
    state = tmp_path / "state"
    with running_server(state, *_flags(120), env=env) as server:
        base, alice, bob = _two_joined(server)
        assert alice.wait_for_train().round == 1
        assert alice.submit(make_update(alice.adapter(1), alice.alpha, 1), 1).accepted
        assert server.stop() == 0

    flag.touch()
    with running_server(state, *_flags(120), env=env) as server:  # it comes up (or this raises)
        operator = ScriptedClient(server.address, "op", token=OPERATOR_TOKEN)
        status = operator.status()  # and serves what it can
        assert status.global_version == 0 and list(status.round.submitted) == [alice.client_id]
        with pytest.raises(grpc.RpcError) as error:
            ScriptedClient(server.address, "carol").join(base)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "history.jsonl could not be rewritten" in server.output()

        flag.unlink()  # space is back: the run goes on where it stopped
        bob = ScriptedClient(server.address, "bob", rank=2, token=bob.token)
        bob.join(base)
        assert bob.wait_for_train().round == 1
        assert bob.submit(make_update(bob.adapter(2), bob.alpha, 1), 1).accepted
        assert operator.wait_for_version(1).global_version == 1

        flag.touch()  # full again at the stop: the database's checkpoint fails, the WAL keeps all
        assert server.stop() == 0
        assert "Traceback" not in server.output() and "stopped cleanly" in server.output()
    flag.unlink()
    with running_server(state, *_flags(120), env=env) as server:
        assert ScriptedClient(server.address, "op", token=OPERATOR_TOKEN).status().global_version == 1


def test_updates_excluded_when_none_was_at_fault_are_taken_again(tmp_path):
    """Issue 28 item 3: the clients retrain the reopened round with the same seed, to the same
    bytes; they were refused as excluded forever, although no update had failed on its own."""
    flag = tmp_path / "aggregation-fault"
    env = {"PYTHONPATH": str(INJECTOR), "FLORA_TEST_AGGREGATION_FAULT": str(flag)}
    with running_server(tmp_path / "state", *_flags(60), env=env) as server:
        state = Path(server.state_dir)
        _, alice, bob = _two_joined(server)
        assert alice.wait_for_train().round == 1
        updates = {client.name: make_update(client.adapter(seed), client.alpha, 1) for client, seed in ((alice, 1), (bob, 2))}
        flag.touch()
        for client in (alice, bob):
            assert client.submit(updates[client.name], 1).accepted
        _wait_for_line(server, "abandoned: every update was excluded")
        flag.unlink()
        for client in (alice, bob):
            assert client.wait_for_train().round == 1  # the reopened attempt
            assert client.submit(updates[client.name], 1).accepted  # the same bytes
        assert alice.wait_for_version(1).global_version == 1
        record = json.loads((state / "history.jsonl").read_text().splitlines()[-1])
        assert sorted(c["name"] for c in record["clients"]) == ["alice", "bob"] and record["attempts"] == 2
        assert sorted(e["name"] for e in record["excluded"]) == ["alice", "bob"]  # attempt 1's, kept for the record
