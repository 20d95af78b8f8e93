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


def test_a_full_disk_refuses_cleanly_and_the_run_resumes_when_space_is_back(tmp_path):
    flag = tmp_path / "disk-is-full"
    env = {"PYTHONPATH": str(INJECTOR), "FLORA_TEST_DISK_FULL": str(flag)}
    flags = ("--min-clients", "2", "--rounds", "1", "--quorum", "1.0", "--round-deadline-s", str(DEADLINE_S),
             "--long-poll-s", "0.5", "--operator-token", OPERATOR_TOKEN, "--checkpoint-every", "0")
    with running_server(tmp_path / "state", *flags, env=env) as server:
        state = Path(server.state_dir)
        base = ScriptedClient(server.address, "op", token=OPERATOR_TOKEN).status().run.base_model_hash
        alice, bob = ScriptedClient(server.address, "alice"), ScriptedClient(server.address, "bob", rank=2)
        alice.join(base)
        bob.join(base)
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
