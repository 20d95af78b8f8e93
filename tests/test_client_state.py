"""The client's state directory: atomic identity, version pointer after weights, locking, resets."""

from __future__ import annotations

import stat

import pytest
import torch

from flora.client.state import HeldVersion, Identity, StateDir, StateError
from flora.common.chunks import write_atomic
from flora.v1 import run_pb2, transfer_pb2

SHAPES = {"m.q_proj": (4, 3), "m.v_proj": (2, 3)}


def weights(value: float) -> dict[str, torch.Tensor]:
    return {name: torch.full(shape, value) for name, shape in SHAPES.items()}


@pytest.fixture()
def state(tmp_path):
    state = StateDir(tmp_path / "state")
    yield state
    state.close()


def test_identity_round_trips_privately(state):
    identity = Identity(run_id="r1", client_id="c1", token="secret", server="localhost:1", name="alice")
    assert state.load_identity() is None
    state.save_identity(identity)
    assert state.load_identity() == identity
    assert stat.S_IMODE((state.root / "identity.json").stat().st_mode) == 0o600
    assert not list(state.root.glob(".*.tmp"))


def test_run_spec_is_cached_as_json(state):
    spec = run_pb2.RunSpec(run_id="r1", base_model="m", rounds=3, target_modules=[run_pb2.TargetModule(name="x", out_features=2, in_features=3)])
    state.save_run(spec)
    assert state.load_run() == spec
    (state.root / "run.json").write_text("{not json")
    assert state.load_run() is None


def test_commit_moves_the_pointer_after_the_weights_and_prunes(state):
    assert state.held_version("r1") == 0
    state.commit("r1", 1, weights(1.0))
    state.commit("r1", 2, weights(2.0))
    assert state.held_version("r1") == 2
    loaded = state.load_weights(2, SHAPES)
    assert all(torch.equal(loaded[n], weights(2.0)[n]) for n in SHAPES)
    assert [p.name for p in state.model_dir.iterdir()] == ["weights-v2.safetensors"]


def test_a_crash_before_the_pointer_moves_keeps_the_old_version(state, monkeypatch):
    state.commit("r1", 1, weights(1.0))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("flora.client.state.write_atomic", crash)
    with pytest.raises(OSError):
        state.commit("r1", 2, weights(2.0))
    monkeypatch.undo()
    assert state.held_version("r1") == 1
    assert torch.equal(state.load_weights(1, SHAPES)["m.q_proj"], weights(1.0)["m.q_proj"])


def test_pointer_to_missing_weights_or_another_run_means_the_base(state):
    write_atomic(state.root / "state.json", HeldVersion(run_id="r1", version=3).model_dump_json().encode())
    assert state.held_version("r1") == 0  # weights-v3 was never written
    state.commit("r1", 1, weights(1.0))
    assert state.held_version("r2") == 0
    (state.root / "state.json").write_text('{"run_id": "r1", "vers')  # torn by hand
    assert state.held_version("r1") == 0


def test_saved_weights_are_validated_against_the_run(state):
    state.commit("r1", 1, weights(1.0))
    with pytest.raises(StateError, match="shape"):
        state.load_weights(1, {"m.q_proj": (4, 4), "m.v_proj": (2, 3)})


def test_one_daemon_per_directory(state):
    with pytest.raises(StateError, match="in use"):
        StateDir(state.root)
    state.close()
    StateDir(state.root).close()


def test_reset_run_forgets_everything_of_the_run(state):
    state.save_identity(Identity(run_id="r1", client_id="c1", token="t", server="s:1", name="a"))
    state.save_run(run_pb2.RunSpec(run_id="r1"))
    state.commit("r1", 1, weights(1.0))
    state.artifact_path(transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE, 2).write_bytes(b"x")
    state.reset_run()
    assert state.load_identity() is None and state.load_run() is None and state.held_version("r1") == 0
    assert not list(state.model_dir.iterdir()) and not list(state.globals_dir.iterdir())


def test_prune_globals_keeps_newer_downloads(state):
    kind = transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE
    for version in (1, 2, 3):
        state.artifact_path(kind, version).write_bytes(b"x")
    (state.globals_dir / "update-v3.safetensors.part").write_bytes(b"y")
    (state.globals_dir / "adapter-v2.safetensors").write_bytes(b"z")  # a download of the stacked format
    state.prune_globals(below=3)
    assert sorted(p.name for p in state.globals_dir.iterdir()) == ["update-v3.safetensors", "update-v3.safetensors.part"]
