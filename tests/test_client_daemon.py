"""The daemon against a scripted coordinator: what it uploads, and how it reacts to each answer."""

from __future__ import annotations

import hashlib
import threading

import grpc
import pytest
import torch

from fake_coordinator import TOKEN, FakeCoordinator, Fault, global_update_payload, random_adapter, serving, tiny_spec
from flora.client.config import ClientSettings
from flora.client.daemon import Daemon
from flora.client.local import ConfigError
from flora.client.sync import UPDATE, LORA, expected_shapes
from flora.common.basemodel import BUILTIN_MODEL, load_model
from flora.common.merge import merged_weights, module_weights
from flora.common.payload import PayloadMeta, encode_adapter, read_adapter
from flora.v1 import coordinator_pb2, run_pb2


def train_task(round_number: int, required: int, lora_version: int | None = None) -> coordinator_pb2.Task:
    """A TRAIN task; with ``lora_version`` the round starts from the global LoRA of that version."""
    return coordinator_pb2.Task(train=coordinator_pb2.TrainTask(
        round=round_number, required_version=required, deadline_unix_ms=2**62, global_lora_version=lora_version or 0,
        start_from_global_lora=lora_version is not None,
    ))


@pytest.fixture(scope="module")
def spec():
    return tiny_spec()


@pytest.fixture()
def data_files(tmp_path):
    train = tmp_path / "train.json"
    train.write_text('[' + ",".join(
        f'{{"instruction": "Add {i} and {i}", "context": "", "response": "{2 * i}", "category": "math"}}' for i in range(6)
    ) + ']')
    validation = tmp_path / "val.jsonl"
    validation.write_text('{"instruction": "Add 9 and 9", "input": "", "output": "18"}\n')
    return train, validation


def run_daemon(tmp_path, fake, data_files, stop=None, **values):
    """Run a daemon against ``fake`` until it returns; returns (exit status, daemon)."""
    train, validation = data_files
    with serving(fake) as address:
        defaults = dict(
            name="alice", server=address, data=[train], validation_data=[validation], state_dir=tmp_path / "state",
            rank=4, max_steps=2, batch_size=2, cutoff=64, progress="off", heartbeat_interval=0.1,
            rpc_timeout=5, long_poll=1, backoff_initial=0.01, backoff_max=0.05,
        )
        settings = ClientSettings(**{**defaults, **values})
        daemon = Daemon(settings, stop)
        return daemon.run(), daemon


def test_a_flora_round_uploads_factors_of_the_declared_rank_and_names(tmp_path, spec, data_files):
    adapter = random_adapter(spec, 5, 1.0, seed=1)
    fake = FakeCoordinator(spec, tasks=[train_task(2, 1)], artifacts={(UPDATE, 1): global_update_payload(adapter, 1)})
    status, daemon = run_daemon(tmp_path, fake, data_files)
    assert status == 0
    (header, payload), = fake.uploads
    uploaded, meta = read_adapter(payload, expected_shapes(spec), rank=4)
    assert sorted(uploaded.pairs) == sorted(expected_shapes(spec)) and uploaded.rank == 4
    assert (meta.kind, meta.round, meta.alpha, meta.scaling_rule) == ("client_update", 2, 8.0, "standard")
    assert (header.round, header.rank, header.alpha, header.base_version, header.num_examples) == (2, 4, 8.0, 1, 6)
    assert header.sha256 == hashlib.sha256(payload).hexdigest() and header.total_bytes == len(payload)
    assert header.steps == 2 and header.train_loss > 0 and header.HasField("validation_loss")
    assert any(torch.count_nonzero(p.b) for p in uploaded.pairs.values())  # it trained
    # The model holds version 1 (base + the global adapter), and so does its saved state.
    want = merged_weights(module_weights(load_model(BUILTIN_MODEL), sorted(adapter.pairs)), adapter)
    got = module_weights(daemon.local.model, sorted(want))
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    assert daemon.state.held_version(spec.run_id) == 1
    assert all(m == f"Bearer {TOKEN}" for m in fake.metadata["NextTask"] + fake.metadata["SubmitUpdate"])


def test_a_restarted_client_rejoins_with_its_identity_and_keeps_its_version(tmp_path, spec, data_files):
    adapter = random_adapter(spec, 3, 1.0, seed=2)
    artifacts = {(UPDATE, 1): global_update_payload(adapter, 1)}
    run_daemon(tmp_path, FakeCoordinator(spec, artifacts=artifacts), data_files)
    again = FakeCoordinator(spec, artifacts=artifacts)
    status, daemon = run_daemon(tmp_path, again, data_files)
    assert status == 0 and daemon.version == 1
    assert again.metadata["Join"] == [f"Bearer {TOKEN}"]
    assert again.requests["Join"][0].base_model_hash == spec.base_model_hash  # checked before Join
    assert not again.requests["FetchGlobal"]  # nothing downloaded again


def test_a_round_that_closes_during_training_is_dropped(tmp_path, spec, data_files):
    fake = FakeCoordinator(spec, tasks=[train_task(1, 0)], round_closed=True)
    status, _ = run_daemon(tmp_path, fake, data_files, max_steps=100_000)
    assert status == 0 and not fake.uploads
    assert fake.requests["Heartbeat"][0].round == 1


def test_an_upload_refused_because_the_round_moved_on_is_dropped(tmp_path, spec, data_files):
    fake = FakeCoordinator(spec, tasks=[train_task(1, 0)])
    fake.faults["SubmitUpdate"] = [Fault(grpc.StatusCode.FAILED_PRECONDITION)]
    status, _ = run_daemon(tmp_path, fake, data_files)
    assert status == 0 and len(fake.requests["SubmitUpdate"]) == 1 and not fake.uploads


def test_transient_failures_are_retried_and_a_forgotten_token_rejoins(tmp_path, spec, data_files):
    fake = FakeCoordinator(spec, tasks=[train_task(1, 0)])
    fake.faults["NextTask"] = [Fault(grpc.StatusCode.UNAVAILABLE), Fault(grpc.StatusCode.UNAUTHENTICATED)]
    fake.faults["SubmitUpdate"] = [Fault(grpc.StatusCode.UNAVAILABLE)]
    status, _ = run_daemon(tmp_path, fake, data_files)
    assert status == 0
    assert len(fake.requests["Join"]) == 2 and len(fake.requests["SubmitUpdate"]) == 2 and len(fake.uploads) == 1


def test_an_update_above_the_runs_max_update_norm_is_not_uploaded(tmp_path, data_files):
    fake = FakeCoordinator(tiny_spec(max_update_norm=1e-12), tasks=[train_task(1, 0)])
    with pytest.raises(ConfigError, match=r"norm .* above the run's max_update_norm 1e-12"):
        run_daemon(tmp_path, fake, data_files)
    assert not fake.requests["SubmitUpdate"]


def test_under_dp_an_update_above_max_update_norm_is_uploaded_for_the_server_to_clip(tmp_path, data_files):
    # Holding it back would make taking part depend on the data (protos/PROTOCOL.md, "Differential privacy").
    spec = tiny_spec(max_update_norm=1e-12, dp_noise_multiplier=1.0, dp_clip_norm=0.5)
    fake = FakeCoordinator(spec, tasks=[train_task(1, 0)])
    status, _ = run_daemon(tmp_path, fake, data_files)
    assert status == 0 and len(fake.uploads) == 1


def test_a_removed_client_stops_training_and_exits_with_the_operators_reason(tmp_path, spec, data_files):
    removed = "NextTask: client 'alice' was removed by the operator: leaked kit"
    fake = FakeCoordinator(spec, tasks=[train_task(1, 0)])
    fake.faults["Heartbeat"] = [Fault(grpc.StatusCode.UNAUTHENTICATED, details=removed)]
    # The first NextTask and Join succeed (None: no fault): the client trains; then its calls are
    # refused, and so are its rejoins (with its own token, then with the kit's).
    fake.faults["NextTask"] = [None, Fault(grpc.StatusCode.UNAUTHENTICATED, details=removed)]
    fake.faults["Join"] = [None] + 2 * [Fault(grpc.StatusCode.UNAUTHENTICATED, details=removed)]
    with pytest.raises(ConfigError, match="removed by the operator: leaked kit"):
        run_daemon(tmp_path, fake, data_files, max_steps=400)
    assert not fake.uploads  # the refused heartbeat stopped the training: nothing trained on was sent


def test_stop_cancels_training_and_leaves(tmp_path, spec, data_files):
    fake = FakeCoordinator(spec, tasks=[train_task(1, 0)])
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    status, _ = run_daemon(tmp_path, fake, data_files, stop=stop, max_steps=1_000_000)
    assert status == 0 and not fake.uploads and len(fake.requests["Leave"]) == 1


def test_a_module_subset_uploads_zero_factors_for_the_rest(tmp_path, spec, data_files):
    fake = FakeCoordinator(spec, tasks=[train_task(1, 0)])
    run_daemon(tmp_path, fake, data_files, target_modules=["q_proj"])
    (_, payload), = fake.uploads
    uploaded, _ = read_adapter(payload, expected_shapes(spec), rank=4)
    for name, pair in uploaded.pairs.items():
        trained = name.endswith("q_proj")
        assert bool(torch.count_nonzero(pair.a)) == trained


def test_fedex_starts_from_the_global_lora_on_the_model_without_it_and_merges_global_updates(tmp_path, data_files):
    spec = tiny_spec(run_pb2.AGGREGATION_METHOD_FEDEX, global_lora_rank=8, required_scaling=2.0)
    lora = random_adapter(spec, 8, 2.0, seed=3)  # the global LoRA of version 1 (rank 8; this client trains 4)
    update = random_adapter(spec, 2, 1.0, seed=4)  # version 1's global update
    meta = PayloadMeta("global_lora", rank=8, alpha=16.0, scaling_rule="standard", version=1)
    fake = FakeCoordinator(spec, tasks=[train_task(2, 1, lora_version=1),
                                        coordinator_pb2.Task(finished=coordinator_pb2.FinishedTask(final_version=1))],
                           artifacts={(LORA, 1): encode_adapter(lora, meta), (UPDATE, 1): global_update_payload(update, 1)})
    status, daemon = run_daemon(tmp_path, fake, data_files)  # rank 4, default alpha 2r: scaling 2
    assert status == 0
    (header, payload), = fake.uploads
    uploaded, _ = read_adapter(payload, expected_shapes(spec), rank=4)
    assert header.base_version == 1
    # Started from the global LoRA's leading rank-4 part: A moved only a little from it.
    name = spec.target_modules[0].name
    assert torch.allclose(uploaded.pairs[name].a, lora.pairs[name].a[:4], atol=0.05)
    # The model is version 1 exactly (base + the global update): the start's removal was undone.
    want = merged_weights(module_weights(load_model(BUILTIN_MODEL), sorted(update.pairs)), update)
    got = module_weights(daemon.local.model, sorted(want))
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)