"""GPT-2 (Conv1D, transposed weights) and Phi-3 (fused layers) with real server and client processes.

One round each over loopback gRPC: every client must hold the server's merged modules, and the
server's model (served and exported) must equal base + sum_k p_k s_k B_k A_k computed in float64
from the uploads, in the orientation each layer stores (the test transposes for Conv1D itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

from client_harness import ServerView
from flora.common.basemodel import load_model
from flora.common.payload import read_adapter
from flora.server.layout import Layout
from harness import server_factory  # noqa: F401 - a pytest fixture
from test_client_integration import RUN_FLAGS, assert_clients_hold_the_servers_model, finish, start
from tiny_families import write_family

pytestmark = pytest.mark.slow


def oracle(state_dir: Path, model_dir: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, bool]]:
    """Version 1 as each layer stores it, base + sum_k p_k s_k B_k A_k in float64 (transposed for
    Conv1D), and whether the layer stores it transposed."""
    (record,) = [r for r in map(json.loads, (state_dir / "history.jsonl").read_text().splitlines()) if r["round"] == 1]
    base = load_model(str(model_dir))
    expected = {}
    for name in shapes:
        delta = torch.zeros(shapes[name], dtype=torch.float64)
        for client in record["clients"]:
            (path,) = (state_dir / "updates" / "r000001").glob(f"{client['client_id']}.*")
            adapter, _ = read_adapter(path, shapes, rank=client["rank"], scaling=2.0)  # the default alpha = 2 r
            delta += client["weight"] * 2.0 * (adapter.pairs[name].b.double() @ adapter.pairs[name].a.double())
        transposed = isinstance(base.get_submodule(name), Conv1D)
        expected[name] = base.get_submodule(name).weight.detach().double() + (delta.T if transposed else delta), transposed
        assert delta.abs().max() > 1e-4, name  # the round changed the module: the comparisons can fail
    return expected


@pytest.mark.parametrize(("family", "server_flags", "client_flags", "suffixes"), [
    ("gpt2", ("--target-modules", "all-linear"), ("--target-modules", "all-linear"), {"c_attn", "c_proj", "c_fc"}),
    ("phi3", (), (), {"qkv_proj"}),
])
def test_one_round_with_real_processes_matches_the_float64_oracle(
    tmp_path, server_factory, family, server_flags, client_flags, suffixes  # noqa: F811
):
    model_dir = write_family(tmp_path / family, family)
    server = server_factory(*RUN_FLAGS, "--rounds", "1", "--min-clients", "2", "--base-model", str(model_dir), *server_flags)
    clients = [start(tmp_path, server.address, "c4", 4, *client_flags), start(tmp_path, server.address, "c2", 2)]
    finish(clients)
    shapes = assert_clients_hold_the_servers_model(tmp_path, server.address, clients, 1)
    assert {name.rsplit(".", 1)[1] for name in shapes} == suffixes
    expected = oracle(server.state_dir, model_dir, shapes)
    view = ServerView(server.address, clients[0].identity().token)
    try:
        served = view.merged_weights(tmp_path, 1, shapes)  # (out, in) whatever the layer stores
    finally:
        view.close()
    with safe_open(Layout(server.state_dir).checkpoint(1) / "model.safetensors", framework="pt") as exported:
        for name, (want, transposed) in expected.items():
            torch.testing.assert_close(exported.get_tensor(f"{name}.weight").double(), want, rtol=0, atol=1e-6)
            torch.testing.assert_close(served[name].double(), want.T if transposed else want, rtol=0, atol=1e-6)
