"""A mixed run with real processes: one client on a 4-bit base, one in full precision, one server.

The server cannot tell them apart. At the end the full-precision client holds the server's merged
weights and the 4-bit client holds, beside its quantized base, exactly the server's cumulative
update (merged weights minus the base), to float round-off.
"""

from __future__ import annotations

import pytest
import torch

from client_harness import ServerView, start_client, write_data
from flora.client.sync import expected_shapes
from flora.common.basemodel import BUILTIN_MODEL, load_model
from flora.common.merge import module_weights
from flora.common.payload import read_update
from flora.common.update import module_delta
from harness import server_factory  # noqa: F401 - a pytest fixture

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

FINISH_S = 180.0  # an upper bound on 2 loaded cores, never a timing assertion
RUN_FLAGS = ("--long-poll-s", "1", "--client-timeout-s", "20", "--round-deadline-s", "120", "--checkpoint-every", "0")


def test_a_4bit_and_a_full_precision_client_finish_a_run_together(tmp_path, server_factory):  # noqa: F811
    server = server_factory(*RUN_FLAGS, "--rounds", "2", "--min-clients", "2")
    clients = {
        name: start_client(server.address, name, write_data(tmp_path / f"{name}.json", "dolly", count=8, offset=rank),
                           tmp_path / f"state-{name}", rank, "--max-steps", "2", *extra)
        for name, rank, extra in (("full", 4, ()), ("nf4", 2, ("--quantize", "nf4")))
    }
    for client in clients.values():
        assert client.wait(FINISH_S) == 0, client.log()
    view = ServerView(server.address, clients["full"].identity().token)
    try:
        status = view.status()
        assert (status.state, status.global_version) == ("finished", 2)
        shapes = expected_shapes(status.run)
        merged = view.merged_weights(tmp_path, 2, shapes)
    finally:
        view.close()
    assert all(c.held_version() == 2 for c in clients.values())
    full = clients["full"].weights(shapes)
    assert all(torch.allclose(full[n], merged[n], rtol=0, atol=1e-6) for n in shapes)
    held, _ = read_update(clients["nf4"].state_dir / "model" / "weights-v2.safetensors", shapes)
    base = module_weights(load_model(BUILTIN_MODEL), sorted(shapes))
    for name in shapes:
        assert torch.allclose(module_delta(held[name]), merged[name] - base[name], rtol=0, atol=1e-6), name
    assert "quantize=nf4" in clients["nf4"].log()
