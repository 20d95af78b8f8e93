"""A state directory of the stacked downlink format is converted at start, exactly and once."""

from __future__ import annotations

import pytest
import torch

from flora.common.lora import LoraAdapter, LoraPair
from flora.common.payload import PayloadMeta, read_update, write_adapter
from flora.common.update import module_delta
from flora.server.layout import Layout
from flora.server.store import Artifact, RunRecord, Store
from flora.server.upgrade import UpgradeError, convert_stacked_downlinks

SHAPES = {"m.q": (8, 20), "m.v": (6, 6)}
RUN = RunRecord("run1", "tiny", "f" * 64, "flora", sorted(SHAPES), {"method": "flora"}, 2, 1.0)


def stacked(rank: int, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    return LoraAdapter({n: LoraPair(torch.randn(rank, i, generator=gen), torch.randn(o, rank, generator=gen))
                        for n, (o, i) in SHAPES.items()}, 1.0)


@pytest.fixture()
def old_state(tmp_path):
    layout = Layout(tmp_path / "state")
    layout.create()
    store = Store(layout.database)
    adapters, rows = {1: stacked(5, 1), 2: stacked(7, 2)}, []
    for version, adapter in adapters.items():
        meta = PayloadMeta("global_adapter", rank=adapter.rank, alpha=float(adapter.rank), scaling_rule="standard",
                           round=version, version=version)
        path = layout.global_artifact(version)
        size, sha = write_adapter(path, adapter, meta)
        rows.append(Artifact("global", version, layout.relative(path), sha, size))
    store.create_run(RUN, rows, None)
    yield layout, store, adapters
    store.close()


def test_stacked_adapters_become_exact_global_updates(old_state):
    layout, store, adapters = old_state
    assert convert_stacked_downlinks(layout, store, SHAPES) == 2
    for version, adapter in adapters.items():
        row = store.artifact("global", version)
        assert row.path == f"downlink/v{version:06d}.safetensors"
        update, meta = read_update(layout.absolute(row.path), SHAPES)
        assert meta.kind == "global_update" and meta.version == version
        for name in SHAPES:
            torch.testing.assert_close(module_delta(update[name]), adapter.delta(name), rtol=1e-5, atol=1e-5)
        assert not layout.global_artifact(version).exists()
    assert convert_stacked_downlinks(layout, store, SHAPES) == 0  # once only


def test_an_unreadable_stacked_adapter_stops_the_start_with_what_to_do(old_state):
    layout, store, _ = old_state
    layout.global_artifact(2).write_bytes(b"not a payload")
    with pytest.raises(UpgradeError, match="globals/v000002.safetensors: cannot be read.*restore it from a backup"):
        convert_stacked_downlinks(layout, store, SHAPES)
    assert store.artifact("global", 1).path.startswith("globals/")  # nothing half-converted in the database
