"""Syncing the client's model: verified downloads, resume at an offset, merge in order, persist."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from fake_coordinator import FakeCoordinator, Fault, global_update_payload, merged_payload, random_adapter, serving, tiny_spec
from flora.client.config import ClientSettings
from flora.client.connection import Connection
from flora.client.progress import Progress
from flora.client.state import StateDir
from flora.client.sync import LORA, MERGED, UPDATE, SyncError, Synchroniser, expected_shapes, restore
from flora.common.basemodel import BUILTIN_MODEL, load_model
from flora.common.merge import merged_weights, module_weights
from flora.common.payload import PayloadMeta, encode_adapter, encode_update


@pytest.fixture(scope="module")
def spec():
    return tiny_spec()


@pytest.fixture(scope="module")
def adapters(spec):
    """Stacked global adapters of versions 1..3 (ranks 6, 3, 5)."""
    return {v: random_adapter(spec, rank, 1.0, seed=v) for v, rank in ((1, 6), (2, 3), (3, 5))}


@pytest.fixture()
def fake(spec, adapters):
    return FakeCoordinator(spec, artifacts={(UPDATE, v): global_update_payload(a, v) for v, a in adapters.items()})


@pytest.fixture()
def client(tmp_path, fake):
    """A Synchroniser talking to the fake coordinator, and its state directory."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    with serving(fake) as address:
        settings = ClientSettings(name="a", data=[data], server=address, backoff_initial=0.01, backoff_max=0.05, rpc_timeout=5)
        conn = Connection(settings, threading.Event())
        conn.token = "client-token-1"
        state = StateDir(tmp_path / "state")
        try:
            yield Synchroniser(conn, state, fake.spec, Progress("off")), state
        finally:
            state.close()
            conn.close()


def expected_weights(model, spec, adapters, versions):
    weights = {n: w.detach().clone() for n, w in module_weights(model, sorted(expected_shapes(spec))).items()}
    for version in versions:
        weights = merged_weights(weights, adapters[version])
    return weights


def test_catch_up_merges_every_missing_version_in_order_and_persists(client, fake, spec, adapters):
    sync, state = client
    model = load_model(BUILTIN_MODEL)
    want = expected_weights(load_model(BUILTIN_MODEL), spec, adapters, [1, 2, 3])
    assert sync.catch_up(model, 0, 2) == 2
    assert sync.catch_up(model, 2, 3) == 3
    got = module_weights(model, sorted(want))
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    assert [(r.from_version, r.to_version, r.offset) for r in fake.requests["FetchGlobal"]] == [(0, 2, 0), (2, 3, 0)]
    assert fake.metadata["FetchGlobal"][0] == "Bearer client-token-1"
    # A restart: the base model plus the saved weights is version 3, with nothing downloaded.
    fresh = load_model(BUILTIN_MODEL)
    assert restore(fresh, state, spec) == 3
    restored = module_weights(fresh, sorted(want))
    assert all(torch.equal(restored[n], got[n]) for n in want)
    assert not list(state.globals_dir.iterdir())  # applied downloads are pruned


def test_an_interrupted_download_resumes_at_the_part_files_size(client, fake, spec, adapters):
    sync, _ = client
    fake.faults["FetchGlobal"] = [Fault(grpc.StatusCode.UNAVAILABLE, after_bytes=8192), Fault(grpc.StatusCode.UNAVAILABLE)]
    model = load_model(BUILTIN_MODEL)
    sync.catch_up(model, 0, 3)
    offsets = [(r.from_version, r.offset) for r in fake.requests["FetchGlobal"]]
    assert offsets[0] == (0, 0) and offsets[1] == (0, 8192) and offsets[-1] == (0, 8192)
    want = expected_weights(load_model(BUILTIN_MODEL), spec, adapters, [1, 2, 3])
    got = module_weights(model, sorted(want))
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)


def test_a_client_restarted_mid_download_resumes_the_global_update(client, fake, spec, adapters, tmp_path):
    sync, state = client
    fake.faults["FetchGlobal"] = [Fault(grpc.StatusCode.INTERNAL, after_bytes=8192)]  # not retried: the daemon dies
    with pytest.raises(grpc.RpcError):
        sync.catch_up(load_model(BUILTIN_MODEL), 0, 2)
    assert [p.name for p in state.globals_dir.iterdir()] == ["update-v1.safetensors.part"]
    state.close()
    restarted = StateDir(state.root)  # a new process on the same state directory
    try:
        fresh = Synchroniser(sync._conn, restarted, spec, Progress("off"))
        model = load_model(BUILTIN_MODEL)
        assert fresh.catch_up(model, 0, 2) == 2
    finally:
        restarted.close()
    assert [(r.from_version, r.offset) for r in fake.requests["FetchGlobal"]] == [(0, 0), (0, 8192)]
    want = expected_weights(load_model(BUILTIN_MODEL), spec, adapters, [1, 2])
    got = module_weights(model, sorted(want))
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)


def test_corrupt_downloads_are_discarded_then_refused(client, fake, adapters):
    sync, state = client
    fake.tamper = True
    model = load_model(BUILTIN_MODEL)
    before = {n: w.clone() for n, w in module_weights(model, sorted(adapters[1].pairs)).items()}
    with pytest.raises(SyncError, match="failed verification 3 times"):
        sync.catch_up(model, 0, 1)
    after = module_weights(model, sorted(before))
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert state.held_version(fake.spec.run_id) == 0 and not list(state.globals_dir.iterdir())


def test_payload_of_the_wrong_shape_is_refused_before_merging(client, fake, spec):
    sync, state = client
    wrong = random_adapter(spec, 2, 1.0, seed=9)
    name = spec.target_modules[0].name
    pairs = dict(wrong.pairs)
    pairs[name] = type(pairs[name])(pairs[name].a[:, :-1], pairs[name].b)
    fake.artifacts[(UPDATE, 1)] = encode_update(pairs, PayloadMeta("global_update", version=1))
    with pytest.raises(SyncError, match="shape"):
        sync.catch_up(load_model(BUILTIN_MODEL), 0, 1)
    assert state.held_version(spec.run_id) == 0


def test_far_behind_the_client_takes_the_merged_modules_instead_of_replaying(client, fake, spec, adapters):
    sync, state = client
    want = expected_weights(load_model(BUILTIN_MODEL), spec, adapters, [1, 2, 3])
    fake.artifacts[(MERGED, 3)] = merged_payload(want, 3)
    fake.merged_instead = True
    fake.faults["FetchGlobal"] = [Fault(grpc.StatusCode.UNAVAILABLE, after_bytes=8192)]  # cut mid-download
    model = load_model(BUILTIN_MODEL)
    assert sync.catch_up(model, 0, 3) == 3
    got = module_weights(model, sorted(want))
    assert all(torch.equal(got[n], want[n]) for n in want)  # the server's weights, bit for bit
    requests = [(r.kind, r.from_version, r.to_version, r.offset, r.allow_merged) for r in fake.requests["FetchGlobal"]]
    assert requests == [(UPDATE, 0, 3, 0, True), (MERGED, 3, 3, 8192, False)]  # the merged download resumed
    assert state.held_version(spec.run_id) == 3 and not list(state.globals_dir.iterdir())


def test_a_server_behind_the_client_is_an_error(client):
    sync, _ = client
    with pytest.raises(SyncError, match="holds version 3"):
        sync.catch_up(load_model(BUILTIN_MODEL), 3, 2)


def test_a_warm_start_downloads_the_global_lora_and_merges_nothing(client, fake, spec):
    sync, state = client
    lora = random_adapter(spec, 4, 2.0, seed=4)
    fake.artifacts[(LORA, 2)] = encode_adapter(lora, PayloadMeta("global_lora", rank=4, alpha=8.0, scaling_rule="standard", version=2))
    got = sync.global_lora(2)
    assert got.rank == 4 and got.scaling == 2.0
    assert all(torch.equal(got.pairs[n].a, lora.pairs[n].a) for n in lora.pairs)
    request = fake.requests["FetchGlobal"][0]
    assert (request.kind, request.to_version) == (LORA, 2)
    assert state.held_version(spec.run_id) == 0  # the model moves by global updates only
