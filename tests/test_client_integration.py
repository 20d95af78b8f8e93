"""Real flora-server and real flora-client processes over loopback, with crashes and restarts.

After every run, each client's saved model must equal the server's merged model (fetched with
MERGED_MODULES) to float round-off: that is what "the clients hold the global model" means.
Only upper bounds on waiting exist here, never timing assertions.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from client_harness import ClientProcess, ServerView, start_client, wait_until, write_data
from flora.client.sync import expected_shapes
from flora.common.payload import read_adapter
from flora.server.layout import Layout
from harness import server_factory  # noqa: F401 - a pytest fixture
from harness import start_server

pytestmark = pytest.mark.slow

FINISH_S = 180.0  # generous upper bounds on 2 loaded cores; never a timing assertion
# Fast rounds: short long-polls, a round deadline no healthy test reaches, an export only at the end.
RUN_FLAGS = ("--long-poll-s", "1", "--client-timeout-s", "20", "--round-deadline-s", "120", "--checkpoint-every", "0")


def start(tmp_path: Path, address: str, name: str, rank: int, *extra: str, form: str = "dolly") -> ClientProcess:
    """A client with its own small data file and state directory under tmp_path."""
    data = write_data(tmp_path / f"{name}.{'json' if form == 'dolly' else 'jsonl'}", form, count=8, offset=rank)
    return start_client(address, name, data, tmp_path / f"state-{name}", rank, "--max-steps", "2", *extra)


def finish(clients: list[ClientProcess]) -> None:
    for client in clients:
        status = client.wait(FINISH_S)
        assert status == 0, f"client {client.name} exited {status}; its log:\n{client.log()}"


def assert_clients_hold_the_servers_model(
    tmp_path: Path, address: str, clients: list[ClientProcess], version: int
) -> dict[str, tuple[int, int]]:
    """Every client's saved weights equal the server's merged weights at ``version``; returns the run's shapes."""
    view = ServerView(address, clients[0].identity().token)
    try:
        status = view.status()
        assert (status.state, status.global_version) == ("finished", version)
        shapes = expected_shapes(status.run)
        server = view.merged_weights(tmp_path, version, shapes)
    finally:
        view.close()
    for client in clients:
        assert client.held_version() == version, client.log()
        local = client.weights(shapes)
        for name in shapes:
            assert torch.allclose(local[name], server[name], rtol=0, atol=1e-6), f"{client.name}: {name} differs"
    return shapes


def test_three_ranks_two_rounds_and_every_client_holds_the_global_model(tmp_path, server_factory):  # noqa: F811
    # Non-default target modules: new clients must learn them (GetRun) before their first Join.
    server = server_factory(*RUN_FLAGS, "--rounds", "2", "--min-clients", "3", "--target-modules", "q_proj,k_proj,v_proj")
    ranks = {"r8": 8, "r4": 4, "r2": 2}
    clients = [start(tmp_path, server.address, name, rank, form="alpaca" if rank == 4 else "dolly") for name, rank in ranks.items()]
    finish(clients)
    spec_shapes = assert_clients_hold_the_servers_model(tmp_path, server.address, clients, 2)
    # What the server stored for each round is exactly the declared rank over exactly the run's modules.
    history = [json.loads(line) for line in (server.state_dir / "history.jsonl").read_text().splitlines()]
    for record in history:
        assert {c["name"]: c["rank"] for c in record["clients"]} == ranks
        for client in clients:
            (path,) = (server.state_dir / "updates" / f"r{record['round']:06d}").glob(f"{client.identity().client_id}.*")
            adapter, meta = read_adapter(path, spec_shapes, rank=ranks[client.name])
            assert sorted(adapter.pairs) == sorted(spec_shapes) and meta.rank == ranks[client.name]
            assert meta.alpha == 2.0 * ranks[client.name]  # the default alpha
    assert {name.rsplit(".", 1)[1] for name in spec_shapes} == {"q_proj", "k_proj", "v_proj"}


def test_a_client_killed_mid_training_rejoins_with_its_identity_and_finishes(tmp_path, server_factory):  # noqa: F811
    server = server_factory(*RUN_FLAGS, "--rounds", "2", "--min-clients", "2")
    steady = start(tmp_path, server.address, "steady", 4)
    victim = start(tmp_path, server.address, "victim", 2, "--max-steps", "1000000")  # trains until killed
    victim.wait_for_log("event=train_start round=1", FINISH_S)
    identity = victim.identity()
    victim.kill()
    restarted = start(tmp_path, server.address, "victim", 2)
    finish([steady, restarted])
    assert restarted.identity() == identity
    assert restarted.log().count(f"event=joined client_id={identity.client_id}") == 2  # before and after the crash
    assert_clients_hold_the_servers_model(tmp_path, server.address, [steady, restarted], 2)


def test_a_late_joiner_catches_up_through_every_version(tmp_path, server_factory):  # noqa: F811
    server = server_factory(*RUN_FLAGS, "--rounds", "3", "--min-clients", "2")
    early = [start(tmp_path, server.address, name, rank) for name, rank in (("early-a", 4), ("early-b", 2))]
    wait_until(lambda: (early[0].state_dir / "identity.json").exists(), FINISH_S, "the first client to join")
    view = ServerView(server.address, early[0].identity().token)
    wait_until(lambda: view.status().global_version >= 1, FINISH_S, "round 1 to commit")
    view.close()
    late = start(tmp_path, server.address, "late", 6)
    finish([*early, late])
    assert "event=download kind=global_update from=1 " in late.log()  # it started from the base model
    assert_clients_hold_the_servers_model(tmp_path, server.address, [*early, late], 3)


def test_clients_survive_a_server_crash_and_restart_on_the_same_port(tmp_path, server_factory):  # noqa: F811
    server = server_factory(*RUN_FLAGS, "--rounds", "3", "--min-clients", "2")
    clients = [start(tmp_path, server.address, name, rank, "--max-steps", "6") for name, rank in (("a", 4), ("b", 2))]
    clients[0].wait_for_log("event=train_start round=1", FINISH_S)
    server.kill()
    wait_until(lambda: any("event=retry" in c.log() for c in clients), FINISH_S, "a client to retry against the dead server")
    restarted = start_server(server.state_dir, *RUN_FLAGS, "--rounds", "3", "--min-clients", "2", "--port", str(server.port))
    try:
        finish(clients)
        assert_clients_hold_the_servers_model(tmp_path, restarted.address, clients, 3)
    finally:
        restarted.kill()


def test_zeropad_clients_end_with_the_servers_exported_model(tmp_path, server_factory):  # noqa: F811
    server = server_factory(*RUN_FLAGS, "--rounds", "2", "--min-clients", "2", "--method", "zeropad",
                            "--lora-rank", "4", "--lora-alpha", "8")
    clients = [start(tmp_path, server.address, name, rank) for name, rank in (("z4", 4), ("z2", 2))]  # alpha 2r: scaling 2
    finish(clients)
    view = ServerView(server.address, clients[0].identity().token)
    try:
        shapes = expected_shapes(view.status().run)
    finally:
        view.close()
    with safe_open(Layout(server.state_dir).checkpoint(2) / "model.safetensors", framework="pt") as exported:
        for client in clients:
            assert client.held_version() == 2
            for name, tensor in client.weights(shapes).items():
                assert torch.allclose(tensor, exported.get_tensor(f"{name}.weight"), rtol=0, atol=1e-6), name


def test_sigterm_leaves_the_run_and_exits_0(tmp_path, server_factory):  # noqa: F811
    server = server_factory(*RUN_FLAGS, "--rounds", "1", "--min-clients", "2")  # never opens a round alone
    client = start(tmp_path, server.address, "lonely", 4)
    wait_until(lambda: (client.state_dir / "identity.json").exists(), FINISH_S, "the client to join")
    client.process.send_signal(signal.SIGTERM)
    assert client.wait(FINISH_S) == 0, client.log()
    view = ServerView(server.address, client.identity().token)
    try:
        assert [c.state for c in view.status().clients] == ["left"]
    finally:
        view.close()
