"""SIGKILL the server at seeded random points of a secure run, again and again (issue 30, Tests).

tests/test_fault_kill.py with --secure-aggregation: three scripted clients (threads speaking
the secure stages through the client's own ``flora.client.secure_stages`` over a real
``Connection``, so that a server restart is ridden out as the client daemon rides it out) each
bring the same seeded LoRA to every attempt of a round. The server is killed while they
advertise, share, mask or unmask, and restarted on the same port and state directory.
Whatever the server does with an interrupted attempt (start it over, or resume it), the run
must complete with each round done once, every round's change exactly plain stacking's of the
three updates, no client's update stored, and no more attempts than the kills explain.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
from pathlib import Path

import grpc
import pytest

from flora.client import secure_stages
from flora.client.config import ClientSettings
from flora.client.connection import Connection, Stopped
from flora.client.local import run_method
from flora.common.lora import LoraAdapter
from flora.v1 import coordinator_pb2 as pb
from flora.v1 import run_pb2, transfer_pb2
from harness import OPERATOR_TOKEN, ScriptedClient, random_adapter, start_server, target_shapes
from secure_processes import Trained, committed_change, relative_error, stacked

pytestmark = pytest.mark.slow

SEED = 30
KILLS = 3  # each secure step is killed in turn by tests/test_secure_resume.py; here, seeded random points
ROUNDS = 3
CLIENTS = {"alice": 4, "bob": 2, "carol": 1}
FLAGS = ("--min-clients", str(len(CLIENTS)), "--rounds", str(ROUNDS), "--round-deadline-s", "120", "--long-poll-s", "0.3",
         "--client-timeout-s", "30", "--operator-token", OPERATOR_TOKEN, "--checkpoint-every", "0", "--secure-aggregation",
         "--secure-stage-deadline-s", "20")


def _update(name: str, number: int, spec: run_pb2.RunSpec) -> LoraAdapter:
    """The update ``name`` brings to every attempt of round ``number`` (alpha 2 r: scaling 2)."""
    seed = int(hashlib.sha256(f"{name}:{number}".encode()).hexdigest()[:8], 16)
    return random_adapter(target_shapes(spec), CLIENTS[name], 2.0, seed)


def _take_part(tmp_path: Path, address: str, name: str, token: str, spec: run_pb2.RunSpec, stop: threading.Event) -> None:
    """One scripted secure client until FINISHED: train (instantly) on TRAIN, do each secure step.
    Its connection retries through server restarts, and its round's secrets stay in memory, as
    the client daemon's do."""
    settings = ClientSettings(server=address, name=name, data=[str(tmp_path)], rpc_timeout=10, backoff_initial=0.1,
                              backoff_max=0.5)
    conn = Connection(settings, stop)
    conn.token = token
    method, session = run_method(spec), None
    try:
        while True:
            try:
                task = conn.call("NextTask", pb.NextTaskRequest(max_wait_ms=300), timeout=10)
                kind = task.WhichOneof("kind")
                if kind == "finished":
                    return
                if kind == "train" and task.train.HasField("secure"):
                    rank = CLIENTS[name]
                    header = transfer_pb2.UpdateHeader(round=task.train.round, rank=rank, alpha=2.0 * rank, num_examples=10,
                                                       scaling_rule=run_pb2.SCALING_RULE_STANDARD,
                                                       base_version=task.train.required_version, steps=1)
                    session = secure_stages.advertise(conn, spec, task.train.secure, header,
                                                      _update(name, task.train.round, spec), None, method)
                elif kind == "secure":
                    secure_stages.handle(conn, session, task.secure)
                elif kind == "wait":
                    stop.wait(min(task.wait.retry_after_ms / 1000, 0.3))
            except (grpc.RpcError, ValueError):
                pass  # refused (the round moved on, a restart lost the attempt): the server decides what follows
    except Stopped:
        return
    finally:
        conn.close()


@pytest.mark.timeout(600)
def test_random_sigkills_of_a_secure_server_lose_nothing_and_store_nothing(tmp_path):
    rng = random.Random(SEED)
    state = tmp_path / "state"
    servers = [start_server(state, *FLAGS)]
    stop, threads = threading.Event(), []
    try:
        operator = ScriptedClient(servers[0].address, "operator", token=OPERATOR_TOKEN)
        spec = operator.status().run
        for name, rank in CLIENTS.items():
            client = ScriptedClient(servers[0].address, name, rank=rank, alpha=2.0 * rank, num_examples=10)
            client.join(spec.base_model_hash)
            threads.append(threading.Thread(target=_take_part, daemon=True,
                                            args=(tmp_path, servers[0].address, name, client.token, spec, stop)))
        for thread in threads:
            thread.start()
        for _ in range(KILLS):
            threads[0].join(rng.uniform(0.5, 4.0))
            servers[-1].kill()
            servers.append(start_server(state, *FLAGS, "--port", str(servers[0].port)))
        for thread in threads:
            thread.join(180)
        assert not any(t.is_alive() for t in threads), f"the run did not finish; the server's log:\n{servers[-1].output()}"
    finally:
        stop.set()
        for server in servers:
            server.kill()

    with sqlite3.connect(state / "state.db") as db:
        done = [r for (r,) in db.execute("SELECT round FROM rounds WHERE state = 'done' ORDER BY round")]
        (final,) = db.execute("SELECT version FROM run").fetchone()
    assert final == ROUNDS and done == list(range(1, ROUNDS + 1))  # each round done exactly once
    history = [json.loads(line) for line in (state / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    assert all(h["secure_aggregation"] and h["secure"]["survivors"] == len(CLIENTS) for h in history)
    assert sum(h["attempts"] - 1 for h in history) <= KILLS, "more attempts than the kills explain"
    for number in range(1, ROUNDS + 1):
        updates = [Trained(name, {m: (p.a, p.b) for m, p in _update(name, number, spec).pairs.items()}, 2.0, 10)
                   for name in CLIENTS]
        want = stacked(updates, spec.secure_clip_norm)
        assert relative_error(committed_change(state, number, target_shapes(spec)), want) < 1e-5, number
    stored = [p for p in (state / "updates").rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 1024 for p in stored), stored  # keys only, never a client's factors
    assert "resuming run" in servers[-1].output()
