"""The warm-started methods end to end: a real flora-server and real flora-client processes.

Two rounds on the built-in tiny model, so that round 2 starts from the global LoRA round 1 left.
Every client must hold the server's merged model at the end (float round-off), and the server's
model must equal an independent dense oracle: the base weights plus, per round, the exact FedAvg
of the clients' models sum_k p_k (s_k B_k A_k - removed_k), computed here from the uploaded
updates and the paper's definition of each method's start (plain SVDs and slices, not
``flora.common.methods``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor

from client_harness import ServerView
from flora.common.basemodel import BUILTIN_MODEL, load_model
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.merge import module_weights
from flora.common.payload import read_adapter
from flora.server.layout import Layout
from harness import server_factory  # noqa: F401 - a pytest fixture
from test_client_integration import RUN_FLAGS, assert_clients_hold_the_servers_model, finish, start

pytestmark = pytest.mark.slow

SCALING = 2.0  # every client trains with the default alpha = 2 r


def history_of(state_dir: Path) -> list[dict]:
    """The committed rounds' lines of the server's history (round 0, the base, left out)."""
    return [r for r in (json.loads(line) for line in (state_dir / "history.jsonl").read_text().splitlines()) if r["round"] > 0]


def rounds_of(state_dir: Path, shapes: dict[str, tuple[int, int]]) -> list[list[tuple[float, dict[str, Tensor], dict]]]:
    """Per committed round: (weight p_k, s_k B_k A_k per module in float64, the adapter) of every update."""
    rounds = []
    for record in history_of(state_dir):
        updates = []
        for client in sorted(record["clients"], key=lambda c: c["client_id"]):
            (path,) = (state_dir / "updates" / f"r{record['round']:06d}").glob(f"{client['client_id']}.*")
            adapter, _ = read_adapter(path, shapes, rank=client["rank"], scaling=SCALING)
            dense = {n: SCALING * (p.b.double() @ p.a.double()) for n, p in adapter.pairs.items()}
            updates.append((client["weight"], dense, adapter))
        rounds.append(updates)
    return rounds


def base_weights(shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    return {n: w.detach().double() for n, w in module_weights(load_model(BUILTIN_MODEL), sorted(shapes)).items()}


def assert_server_model_is(tmp_path: Path, address: str, token: str, oracle: dict[str, Tensor]) -> None:
    view = ServerView(address, token)
    try:
        served = view.merged_weights(tmp_path, 2, {n: tuple(t.shape) for n, t in oracle.items()})
    finally:
        view.close()
    for name, want in oracle.items():
        assert torch.allclose(served[name].double(), want, rtol=0, atol=1e-5), name


def test_fedex_with_equal_ranks_merges_the_exact_fedavg_and_clients_hold_it(tmp_path, server_factory):  # noqa: F811
    server = server_factory(*RUN_FLAGS, "--rounds", "2", "--min-clients", "2", "--method", "fedex",
                            "--lora-rank", "4", "--lora-alpha", "8", "--seed", "5")
    clients = [start(tmp_path, server.address, name, 4) for name in ("e1", "e2")]
    finish(clients)
    shapes = assert_clients_hold_the_servers_model(tmp_path, server.address, clients, 2)
    # The oracle: round 1 starts from the seeded global LoRA G0 (B = 0), round 2 from G1, the
    # plain averages of round 1's A and B; each round merges sum_k p_k (s B_k A_k - s B_G A_G).
    layout = Layout(server.state_dir)
    g0, _ = read_adapter(layout.global_artifact(0), shapes)
    model = base_weights(shapes)
    kept = g0
    for updates in rounds_of(server.state_dir, shapes):
        for name in shapes:
            start_delta = SCALING * (kept.pairs[name].b.double() @ kept.pairs[name].a.double())
            model[name] = model[name] + sum(p * (dense[name] - start_delta) for p, dense, _ in updates)
        kept = LoraAdapter({n: LoraPair(sum(p * u.pairs[n].a for p, _, u in updates), sum(p * u.pairs[n].b for p, _, u in updates))
                            for n in shapes}, SCALING)
    served_g2, _ = read_adapter(layout.global_artifact(2), shapes)  # what round 3 would start from
    for name in shapes:
        assert torch.allclose(served_g2.pairs[name].a, kept.pairs[name].a, atol=1e-6)
        assert torch.allclose(served_g2.pairs[name].b, kept.pairs[name].b, atol=1e-6)
    # Round 2 started warm: each upload's A is G1's A moved by two small steps, not a fresh draw.
    g1, _ = read_adapter(layout.global_artifact(1), shapes)
    name = sorted(shapes)[0]
    for _, _, update in rounds_of(server.state_dir, shapes)[1]:
        assert torch.allclose(update.pairs[name].a, g1.pairs[name].a, atol=0.05)
    assert_server_model_is(tmp_path, server.address, clients[0].identity().token, model)


def top(dense: Tensor, rank: int) -> Tensor:
    """The best rank-``rank`` approximation of a matrix (Eckart-Young, by a full SVD)."""
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_flora_warm_with_mixed_ranks_starts_from_the_aggregate_and_stays_exact(tmp_path, server_factory):  # noqa: F811
    server = server_factory(*RUN_FLAGS, "--rounds", "2", "--min-clients", "2", "--method", "flora-warm")
    ranks = {"w4": 4, "w2": 2}
    clients = [start(tmp_path, server.address, name, rank) for name, rank in ranks.items()]
    finish(clients)
    shapes = assert_clients_hold_the_servers_model(tmp_path, server.address, clients, 2)
    first, second = rounds_of(server.state_dir, shapes)
    aggregate = {n: sum(p * dense[n] for p, dense, _ in first) for n in shapes}
    model = base_weights(shapes)
    for name in shapes:
        model[name] = model[name] + aggregate[name]  # round 1: fresh LoRAs, stacked
        model[name] = model[name] + sum(p * (dense[name] - top(aggregate[name], u.rank)) for p, dense, u in second)
    assert_server_model_is(tmp_path, server.address, clients[0].identity().token, model)
    # Round 2 started warm: each client's update is near the top-r_k part of round 1's aggregate
    # (a fresh LoRA, B = 0, would be near zero after two small steps).
    for _, dense, update in second:
        name = max(shapes, key=lambda n: top(aggregate[n], update.rank).norm())
        start_part = top(aggregate[name], update.rank)
        assert (dense[name] - start_part).norm() < 0.5 * start_part.norm(), name


def test_ffa_with_mixed_ranks_uploads_b_alone_and_stays_exact(tmp_path, server_factory):  # noqa: F811
    server = server_factory(*RUN_FLAGS, "--rounds", "2", "--min-clients", "2", "--method", "ffa",
                            "--lora-rank", "4", "--lora-alpha", "8", "--seed", "3")
    ranks = {"f4": 4, "f2": 2}
    clients = [start(tmp_path, server.address, name, rank) for name, rank in ranks.items()]
    finish(clients)
    shapes = assert_clients_hold_the_servers_model(tmp_path, server.address, clients, 2)
    # The oracle: A is G0's forever; client k trains B_k against A[:r_k] from B_G[:, :r_k] on the
    # model minus that part, so each round merges sum_k p_k s (B_k - B_G[:, :r_k]) A[:r_k] and
    # the next B_G is sum_k p_k pad(B_k). The uploaded files are read as plain safetensors.
    layout = Layout(server.state_dir)
    g0, _ = read_adapter(layout.global_artifact(0), shapes)
    a = {n: g0.pairs[n].a.double() for n in shapes}
    b_g = {n: g0.pairs[n].b.double() for n in shapes}
    model = base_weights(shapes)
    for record in history_of(server.state_dir):
        new_b = {n: torch.zeros_like(b_g[n]) for n in shapes}
        for client in record["clients"]:
            (path,) = (server.state_dir / "updates" / f"r{record['round']:06d}").glob(f"{client['client_id']}.*")
            with safe_open(path, framework="pt") as file:
                assert sorted(file.keys()) == sorted(f"{n}.lora_B" for n in shapes)  # no lora_A went up
                b = {n: file.get_tensor(f"{n}.lora_B").double() for n in shapes}
            assert client["bytes"] == path.stat().st_size
            r, p = client["rank"], client["weight"]
            for name in shapes:
                model[name] = model[name] + p * SCALING * ((b[name] - b_g[name][:, :r]) @ a[name][:r])
                new_b[name][:, :r] += p * b[name]
        b_g = new_b
    served_g2, _ = read_adapter(layout.global_artifact(2), shapes)
    for name in shapes:
        assert torch.equal(served_g2.pairs[name].a, g0.pairs[name].a)  # A never moves
        assert torch.allclose(served_g2.pairs[name].b.double(), b_g[name], atol=1e-6)
    assert any(b_g[n].abs().max() > 0 for n in shapes)  # B trained: the check above is not 0 == 0
    assert_server_model_is(tmp_path, server.address, clients[0].identity().token, model)
