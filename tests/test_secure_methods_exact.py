"""flora-warm and ffa under secure aggregation merge what plain aggregation merges (issue 30, Tests).

Three rounds of four real client processes of mixed ranks (8/4/2/1: the issue's 16/8/4/2 halved,
so that the tiny model's modules stay sketched, not dense) against a server with
--secure-aggregation. Each client also writes the LoRA it trained each round
(tests/secfaults/sitecustomize.py). The oracle is a plain server of the same method fed exactly
those updates by scripted clients: a plain run of the same clients would train the same ones.
Both servers' changes each round, and their merged models, must agree to float round-off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from client_harness import ServerView
from flora.client.sync import expected_shapes
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import get_method
from flora.common.payload import PayloadMeta, encode_adapter
from harness import OPERATOR_TOKEN, ScriptedClient
from harness import server_factory  # noqa: F401 - a pytest fixture
from secure_processes import attempt_key, committed_change, finish_all, hooked_env, relative_error, start_hooked
from test_client_integration import RUN_FLAGS

pytestmark = pytest.mark.slow

RANKS = {"r8": 8, "r4": 4, "r2": 2, "r1": 1}
ROUNDS = 3


def _flags(method: str) -> tuple[str, ...]:
    return (*RUN_FLAGS, "--rounds", str(ROUNDS), "--min-clients", str(len(RANKS)), "--method", method)


def _secure_run(tmp_path: Path, server_factory, method: str):  # noqa: F811
    """The secure run: its server, status at the end and history; the clients' dumps in tmp_path/dump."""
    dump = tmp_path / "dump"
    dump.mkdir()
    server = server_factory(*_flags(method), "--secure-aggregation", state_dir=tmp_path / "secure")
    clients = [start_hooked(tmp_path, server.address, name, rank, 10 * i, hooked_env(dump))
               for i, (name, rank) in enumerate(RANKS.items())]
    finish_all(clients)
    view = ServerView(server.address, clients[0].identity().token)
    try:
        status = view.status()
        merged = view.merged_weights(tmp_path, ROUNDS, expected_shapes(status.run))
    finally:
        view.close()
    history = [json.loads(line) for line in (server.state_dir / "history.jsonl").read_text().splitlines()]
    return server, status, merged, [r for r in history if r["round"] > 0]


def _dumped(path: Path) -> tuple[LoraAdapter, int]:
    """A dumped LoRA and the examples its client claimed."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        modules = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        pairs = {m: LoraPair(f.get_tensor(f"{m}.a"), f.get_tensor(f"{m}.b")) for m in modules}
    return LoraAdapter(pairs, float(meta["scaling"])), int(meta["num_examples"])


def _replay(tmp_path: Path, server_factory, method: str, updates: dict[int, dict[str, Path]]):  # noqa: F811
    """A plain server of ``method`` fed each round's dumped updates; its merged weights at the end."""
    server = server_factory(*_flags(method), "--operator-token", OPERATOR_TOKEN, state_dir=tmp_path / "plain")
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
            meta = PayloadMeta("client_update", rank=adapter.rank, alpha=client.alpha, scaling_rule="standard", round=number)
            assert client.submit(encode_adapter(adapter, meta, with_a=with_a), number).accepted
    status = clients["r8"].wait_for_version(ROUNDS)
    view = ServerView(server.address, clients["r8"].token)
    try:
        return server, view.merged_weights(tmp_path, ROUNDS, expected_shapes(status.run))
    finally:
        view.close()


@pytest.mark.timeout(900)  # nine client process rounds and two servers: minutes on a loaded machine
@pytest.mark.parametrize("method", ["flora-warm", "ffa"])
def test_secure_rounds_merge_the_plain_methods_model_round_by_round(tmp_path, server_factory, method):  # noqa: F811
    secure, status, merged, history = _secure_run(tmp_path, server_factory, method)
    assert [(r["secure_aggregation"], r["secure"]["survivors"], r["attempts"]) for r in history] == [(True, 4, 1)] * ROUNDS
    run_id, dump = status.run.run_id, tmp_path / "dump"
    updates = {r["round"]: {name: dump / f"{name}-{attempt_key(run_id, r['round'], r['attempts'])}.safetensors"
                            for name in RANKS} for r in history}
    plain, plain_merged = _replay(tmp_path, server_factory, method, updates)
    shapes = expected_shapes(status.run)
    for number in range(1, ROUNDS + 1):
        want = committed_change(plain.state_dir, number, shapes)
        assert relative_error(committed_change(secure.state_dir, number, shapes), want) < 1e-5, number
    for name, want in plain_merged.items():
        assert torch.allclose(merged[name], want, rtol=1e-6, atol=1e-6), name
    # The secure server stored no client's factors: only public keys took the updates' place.
    stored = [p for p in (secure.state_dir / "updates").rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 1024 for p in stored), stored
