"""Secure rounds of flora, flora-warm and ffa merge what plain aggregation merges (issue 30, Tests).

One secure run per method, shared by this file's tests (a module fixture): three rounds of four
real client processes of mixed ranks (8/4/2/1: the issue's 16/8/4/2 halved, so that the tiny
model's modules stay sketched, not dense) against a server with --secure-aggregation. Each client
also writes the LoRA it trained each round, and its clear pass vectors; flora's server writes its
heap at round 1's unmaskings and write (tests/secfaults/sitecustomize.py). The oracle is a plain
server of the same method fed exactly those updates by scripted clients: a plain run of the same
clients would train the same ones. Both servers' changes each round, and their merged models,
must agree to float round-off; flora's run is also what tests/test_secure_nothing_individual.py's
scan reads (its test lives here, next to the run it reads).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load, load_file

from client_harness import ServerView
from flora.client.sync import expected_shapes
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import get_method
from flora.common.payload import PayloadMeta, encode_adapter
from flora.v1 import coordinator_pb2 as pb
from harness import OPERATOR_TOKEN, ScriptedClient, ServerProcess, start_server
from leaks import byte_leaks, holds_a_sum, leaks
from secure_processes import (
    attempt_key, clear_values, committed_change, finish_all, hooked_env, relative_error, start_hooked, trained,
)
from test_client_integration import RUN_FLAGS, assert_clients_hold_the_servers_model

pytestmark = pytest.mark.slow

RANKS = {"r8": 8, "r4": 4, "r2": 2, "r1": 1}
ROUNDS = 3
METHODS = ("flora", "flora-warm", "ffa")


@dataclass
class Run:
    """What one server of a run left: its state directory, final status, merged weights, history, output."""

    state_dir: Path
    status: pb.StatusReply
    merged: dict[str, torch.Tensor]
    history: list[dict]
    output: str


@dataclass
class SecureAndPlain:
    """A method's secure run, the plain replay of its updates, and the secure clients' dumps."""

    method: str
    secure: Run
    plain: Run
    dump: Path  # the clients' clear values
    held: Path  # the secure server's heap at round 1 (flora only)


def _flags(method: str) -> tuple[str, ...]:
    return (*RUN_FLAGS, "--rounds", str(ROUNDS), "--min-clients", str(len(RANKS)), "--method", method)


def _ended(server: ServerProcess, view: ServerView, folder: Path) -> Run:
    """The finished run's status and merged weights (asked while it serves), then its files once it stopped."""
    try:
        status = view.status()
        merged = view.merged_weights(folder, ROUNDS, expected_shapes(status.run))
    finally:
        view.close()
    assert server.stop() == 0, server.output()  # SIGTERM: what it keeps is on disk for the tests to read
    history = [json.loads(line) for line in (server.state_dir / "history.jsonl").read_text().splitlines()]
    return Run(server.state_dir, status, merged, [r for r in history if r["round"] > 0], server.output())


def _secure_run(folder: Path, method: str, dump: Path, held: Path) -> Run:
    """The secure run (flora's server writes its heap to ``held``), its clients finished."""
    server_env = hooked_env(held, server=True) if method == "flora" else None
    server = start_server(folder / "secure", *_flags(method), "--secure-aggregation", env=server_env)
    try:
        clients = [start_hooked(folder, server.address, name, rank, 10 * i, hooked_env(dump))
                   for i, (name, rank) in enumerate(RANKS.items())]
        finish_all(clients)
        assert_clients_hold_the_servers_model(folder, server.address, clients, ROUNDS)
        return _ended(server, ServerView(server.address, clients[0].identity().token), folder)
    finally:
        server.kill()


def _dumped(path: Path) -> tuple[LoraAdapter, int]:
    """A dumped LoRA and the examples its client claimed."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        modules = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        pairs = {m: LoraPair(f.get_tensor(f"{m}.a"), f.get_tensor(f"{m}.b")) for m in modules}
    return LoraAdapter(pairs, float(meta["scaling"])), int(meta["num_examples"])


def _replay(server: ServerProcess, folder: Path, method: str, updates: dict[int, dict[str, Path]]) -> Run:
    """The plain ``server`` of ``method`` fed each round's dumped updates by scripted clients."""
    try:
        base_hash = ScriptedClient(server.address, "operator", token=OPERATOR_TOKEN).status().run.base_model_hash
        clients = {}
        for name, rank in RANKS.items():
            _, examples = _dumped(updates[1][name])
            clients[name] = ScriptedClient(server.address, name, rank=rank, alpha=2.0 * rank, num_examples=examples)
            clients[name].join(base_hash)
        with_a = get_method(method).trains_a  # ffa uploads B alone, as its clients do
        for number in range(1, ROUNDS + 1):
            for name, client in clients.items():
                assert client.wait_for_train().round == number
                adapter, _ = _dumped(updates[number][name])
                meta = PayloadMeta("client_update", rank=adapter.rank, alpha=client.alpha, scaling_rule="standard",
                                   round=number)
                assert client.submit(encode_adapter(adapter, meta, with_a=with_a), number).accepted
        clients["r8"].wait_for_version(ROUNDS)
        for client in clients.values():
            client.close()
        return _ended(server, ServerView(server.address, clients["r8"].token), folder)
    finally:
        server.kill()


def _run_both(folder: Path, method: str) -> SecureAndPlain:
    dump, held = folder / "dump", folder / "held"
    dump.mkdir()
    held.mkdir()
    with ThreadPoolExecutor(1) as pool:  # the plain server starts while the secure run goes on: it waits for clients
        starting = pool.submit(start_server, folder / "plain", *_flags(method), "--operator-token", OPERATOR_TOKEN)
        try:
            secure = _secure_run(folder, method, dump, held)
        except BaseException:
            starting.result().kill()
            raise
        plain_server = starting.result()
    run_id = secure.status.run.run_id
    # The committed attempt's updates (a retried attempt is fine: how many attempts a loaded machine
    # needs is not what these tests are about).
    updates = {r["round"]: {name: dump / f"{name}-{attempt_key(run_id, r['round'], r['attempts'])}.safetensors"
                            for name in RANKS} for r in secure.history}
    return SecureAndPlain(method, secure, _replay(plain_server, folder, method, updates), dump, held)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Callable[[str], SecureAndPlain]:
    """``runs(method)``: the method's secure run and plain replay, made once for all of this file's tests."""
    made: dict[str, SecureAndPlain | Exception] = {}

    def get(method: str) -> SecureAndPlain:
        if method not in made:
            try:
                made[method] = _run_both(tmp_path_factory.mktemp(method), method)
            except Exception as error:  # failed in the first test that asked: not run again for each next one
                made[method] = error
                raise
        if isinstance(made[method], Exception):
            pytest.fail(f"{method}'s runs failed in an earlier test of this file: {made[method]}"[:2000])
        return made[method]

    return get


@pytest.mark.timeout(900)  # the first test of a method makes its run: minutes on a loaded machine
@pytest.mark.parametrize("method", METHODS)
def test_secure_rounds_merge_the_plain_methods_model_round_by_round(runs, method):
    run = runs(method)
    shapes = expected_shapes(run.secure.status.run)
    for number in range(1, ROUNDS + 1):
        want = committed_change(run.plain.state_dir, number, shapes)
        assert relative_error(committed_change(run.secure.state_dir, number, shapes), want) < 1e-5, number
    for name, want in run.plain.merged.items():
        assert torch.allclose(run.secure.merged[name], want, rtol=1e-6, atol=1e-6), name


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", METHODS)
def test_secure_rounds_are_recorded_as_secure_and_store_no_update(runs, method):
    run = runs(method)
    # Every client in every round, in the history and in Status; the plain run's rounds say nothing of it.
    assert [(r["secure_aggregation"], r["secure"]["survivors"], r["num_clients"]) for r in run.secure.history] == [
        (True, len(RANKS), len(RANKS))] * ROUNDS
    assert [r["secure_aggregation"] for r in run.plain.history] == [False] * ROUNDS
    recent = run.secure.status.recent_rounds
    assert [(r.secure.survivors, r.secure.bytes_up > 0) for r in recent] == [(len(RANKS), True)] * ROUNDS
    assert len(run.plain.status.recent_rounds) == ROUNDS
    assert not any(r.HasField("secure") for r in run.plain.status.recent_rounds)
    # Only public keys took the updates' place: no file holds a client's factors (the plain run's do).
    stored = [p for p in (run.secure.state_dir / "updates").rglob("*") if p.is_file()]
    assert stored and all(p.stat().st_size < 1024 for p in stored), stored
    assert all(p.stat().st_size >= 1024 for p in (run.plain.state_dir / "updates").rglob("*") if p.is_file())


@pytest.mark.timeout(900)
def test_the_server_keeps_only_masked_values_and_sums(runs):
    # tests/test_secure_nothing_individual.py's docstring says what is compared and why.
    run = runs("flora")
    key = attempt_key(run.secure.status.run.run_id, 1, 1)
    clear, allowed, bits = clear_values(run.dump, key, RANKS)
    clients = [trained(run.dump, name, key) for name in RANKS]  # round 1's change, which the server computes and keeps
    allowed += [sum(c.change()[module] for c in clients).numpy() / len(clients) for module in clients[0].pairs]
    # What the server publishes to every client is the sums' by definition: each round's downlink.
    # (Its factors' rows approach single clients' A rows when their subspaces are far apart.)
    for version in range(1, ROUNDS + 1):
        allowed += list(load_file(run.secure.state_dir / "downlink" / f"v{version:06d}.safetensors").values())

    snapshots = sorted(run.held.glob(f"server-{key}-*.npz"))
    assert [p.stem.rsplit("-", 1)[1] for p in snapshots] == ["unmask1", "unmask2", "write"]
    for path in snapshots:
        with np.load(path, allow_pickle=False) as saved:
            held = {f"{path.stem}:{k}": saved[k] for k in saved.files}
        assert not leaks(held, clear, allowed), path.stem
        if path.stem.endswith("unmask1"):  # the scan sees the heap: the unmasked sum is in it
            assert holds_a_sum(held, allowed[0]), "the stage-1 sum is not among the held arrays"

    files = [p for p in run.secure.state_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        blob = path.read_bytes()
        assert not byte_leaks(blob, clear, bits), path
        if path.suffix == ".safetensors" and path.parent.parent.name != "updates":
            tensors = {f"{path.name}:{k}": v for k, v in load(blob).items()}
            assert not leaks(tensors, clear, allowed), path
    log = run.secure.output
    assert not byte_leaks(log.encode(), clear, bits)
    for name, value in clear.items():
        top = float(value.reshape(-1)[np.argmax(np.abs(value))])
        assert not any(text in log for text in (repr(top), f"{top:.6g}", f"{top:.5e}")), name
