"""SIGKILL the server at random points of a multi-round run, again and again, then audit the state.

A seeded schedule kills the real server process 10 times: during uploads, during aggregation,
between rounds. Each time it is restarted on the same state directory and the two scripted
clients rejoin and carry on. At the end: every upload a client saw accepted is in the state,
no round was done twice, versions are contiguous, and the final checkpoint equals the base model
plus the sum of the global artifacts, read back through the project's own loader.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from flora.common.basemodel import BUILTIN_MODEL, load_model
from flora.common.merge import module_weights
from flora.common.payload import artifact_limits, read_update
from flora.common.update import module_delta
from harness import OPERATOR_TOKEN, ScriptedClient, make_update, start_server, target_shapes

pytestmark = pytest.mark.slow

SEED = 11
KILLS = 10
ROUNDS = 4
CLIENTS = (("alice", 4, 8.0), ("bob", 2, 4.0))
FLAGS = ("--min-clients", "2", "--rounds", str(ROUNDS), "--quorum", "1.0", "--round-deadline-s", "120",
         "--long-poll-s", "0.3", "--operator-token", OPERATOR_TOKEN, "--checkpoint-every", "0")


def _drive(address: str, tokens: dict[str, str], accepted: list[tuple[int, str, str]], stop: threading.Event) -> None:
    """Take part in the run until it finishes, the server dies or ``stop`` is set."""
    try:
        operator = ScriptedClient(address, "operator", token=OPERATOR_TOKEN)
        base = operator.status().run.base_model_hash
        clients = []
        for name, rank, alpha in CLIENTS:
            client = ScriptedClient(address, name, rank=rank, alpha=alpha)
            client.join(base, token=tokens.get(name))
            tokens[name] = client.token
            clients.append(client)
        while not stop.is_set():
            status = operator.status()
            if status.state == "finished":
                return
            current = status.round
            for client in clients:
                if current.state == "open" and client.client_id in current.selected and client.client_id not in current.submitted:
                    seed = int(hashlib.sha256(f"{client.name}:{current.round}".encode()).hexdigest()[:8], 16)
                    payload = make_update(client.adapter(seed), client.alpha, current.round)
                    if client.submit(payload, current.round).accepted:
                        accepted.append((current.round, client.client_id, hashlib.sha256(payload).hexdigest()))
            time.sleep(0.05)
    except grpc.RpcError:
        return  # the server was killed under us


def _life(state: Path, tokens: dict, accepted: list, kill_after: float | None) -> str:
    """One server process: start, let the clients work, then SIGKILL it (or, finally, finish)."""
    server = start_server(state, *FLAGS)
    stop = threading.Event()
    worker = threading.Thread(target=_drive, args=(server.address, tokens, accepted, stop), daemon=True)
    worker.start()
    try:
        worker.join(kill_after if kill_after is not None else 180)
        if kill_after is None:
            assert not worker.is_alive(), "the run did not finish after the last restart"
    finally:
        server.kill()
        stop.set()
        worker.join(30)
    return server.output()


@pytest.mark.timeout(900)  # 11 server starts: about a minute on an idle 2-core machine, more under load
def test_random_sigkills_lose_nothing_and_redo_nothing(tmp_path):
    rng = random.Random(SEED)
    state = tmp_path / "state"
    tokens: dict[str, str] = {}
    accepted: list[tuple[int, str, str]] = []
    for _ in range(KILLS):
        _life(state, tokens, accepted, kill_after=rng.uniform(0.2, 3.0))
    output = _life(state, tokens, accepted, kill_after=None)

    with sqlite3.connect(state / "state.db") as db:
        recorded = set(db.execute("SELECT round, client_id, sha256 FROM submissions"))
        versions = [v for (v,) in db.execute("SELECT version FROM versions ORDER BY version")]
        done = [r for (r,) in db.execute("SELECT round FROM rounds WHERE state = 'done' ORDER BY round")]
        (final,) = db.execute("SELECT version FROM run").fetchone()
        excluded = list(db.execute("SELECT * FROM exclusions"))
    assert accepted and set(accepted) <= recorded, "an upload a client saw accepted is missing from the state"
    assert not excluded
    assert final == ROUNDS and done == list(range(1, ROUNDS + 1))  # each round done exactly once
    assert versions in (list(range(ROUNDS + 1)), list(range(1, ROUNDS + 1)))  # contiguous (v0 only with validation)
    history = [json.loads(line) for line in (state / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    assert "resuming run" in output

    model = load_model(BUILTIN_MODEL)
    base = {n: w.detach().double() for n, w in module_weights(model, sorted(_shapes(model))).items()}
    shapes = _shapes(model)
    for version in range(1, ROUNDS + 1):
        path = state / "downlink" / f"v{version:06d}.safetensors"
        update, _ = read_update(path, shapes, limits=artifact_limits(path.stat().st_size, shapes))
        for name in base:
            base[name] += module_delta(update[name], torch.float64)
    checkpoint = load_file(state / "checkpoints" / f"v{ROUNDS:06d}" / "model.safetensors")
    for name, expected in base.items():
        torch.testing.assert_close(checkpoint[f"{name}.weight"].double(), expected, rtol=1e-5, atol=1e-5)


def _shapes(model) -> dict[str, tuple[int, int]]:
    from flora.common.basemodel import DEFAULT_TARGET_MODULES, target_module_shapes
    return target_module_shapes(model, list(DEFAULT_TARGET_MODULES))
