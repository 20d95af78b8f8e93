"""The server's rounds under client-level DP (issue 31): everything written and served comes from
the noisy release alone, and the served model is the noiseless one plus noise of the announced
scale. In one process through ``Aggregator.aggregate``, then with real server processes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import get_method
from flora.common.payload import PayloadMeta, encode_adapter, read_adapter, read_update
from flora.common.update import module_delta
from flora.common.weights import client_weights
from flora.common.privacy import private_round as private
from flora.common.robust import change_norm, update_norm
from flora.server.aggregator import Aggregator
from flora.server.config import ServerSettings
from flora.server.layout import Layout
from flora.server.lifecycle import error_phrase
from flora.server.startup import open_run
from flora.server.store import Store, Submission
from flora.v1 import transfer_pb2
from harness import OPERATOR_TOKEN, ScriptedClient, artifacts, make_update, running_server, target_shapes

CLIENTS = (("a1", 4, 6), ("b2", 2, 3), ("c3", 1, 5))  # client id (hex), rank, number of examples


def open_aggregator(state: Path, **settings) -> tuple[Aggregator, Layout]:
    """A server's model and run as ``flora-server`` opens them (built-in model, CPU)."""
    state.parent.mkdir(parents=True, exist_ok=True)
    validation = state.parent / "validation.jsonl"
    validation.write_text("".join(f'{{"instruction": "Add {i} and 2", "input": "", "output": "{i + 2}"}}\n' for i in range(4)))
    settings = {"rounds": 1, **settings}
    config = ServerSettings(state_dir=state, merge_device="cpu", validation_data=[str(validation)], **settings)
    layout = Layout(state)
    layout.create()
    aggregator = Aggregator(config, layout)
    store = Store(layout.database)
    try:
        open_run(config, layout, store, aggregator)
    finally:
        store.close()
    return aggregator, layout


def uploads(aggregator: Aggregator, layout: Layout, seed: int, number: int = 1) -> list[Submission]:
    """Each client's start moved by a seeded step, encoded and stored as an accepted upload of round ``number``."""
    generator = torch.Generator().manual_seed(seed)
    submissions = []
    for client_id, rank, count in CLIENTS:
        start = aggregator.start_of(rank, 2.0)
        pairs = {}
        for name, (d_out, d_in) in aggregator.shapes.items():
            a = start.init.pairs[name].a if start.init is not None else torch.randn(rank, d_in, generator=generator) * 0.1
            b = start.init.pairs[name].b if start.init is not None else torch.zeros(d_out, rank)
            pairs[name] = LoraPair(a.contiguous(), b + torch.randn(d_out, rank, generator=generator) * 0.01)
        submissions.append(stored(layout, client_id, count, LoraAdapter(pairs, 2.0), number, start.train_a))
    return submissions


def stored(layout: Layout, client_id: str, count: int, adapter: LoraAdapter, number: int, with_a: bool = True) -> Submission:
    """``adapter`` (scaling 2: alpha = 2 rank) encoded and stored as client ``client_id``'s accepted upload."""
    rank, alpha = adapter.rank, 2.0 * adapter.rank
    meta = PayloadMeta("client_update", rank=rank, alpha=alpha, scaling_rule="standard", round=number)
    payload = encode_adapter(adapter, meta, with_a=with_a)
    sha = hashlib.sha256(payload).hexdigest()
    path = layout.update(number, client_id, sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return Submission(number, client_id, sha, layout.relative(path), len(payload), rank, alpha, 1, count, 0,
                      None, None, 2, 0.0, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flora-warm", "flexlora", "ffa"])
def test_every_artifact_is_a_function_of_the_noisy_release_alone(tmp_path, monkeypatch, method):
    # Two servers, two different sets of client updates (same ranks and claims), two rounds (the
    # second from warm starts). The second server's releases are replaced by the first's
    # recordings: if anything written or served read a clear update other than through the
    # release, the two servers' files would differ.
    settings = {"method": method, "dp_noise_multiplier": 1.0, "dp_clip_norm": 0.05, "lora_rank": 4, "rounds": 2}
    recorded = []
    real_release = private.release
    monkeypatch.setattr(private, "release", lambda *args: recorded.append(real_release(*args)) or recorded[-1])
    first, first_layout = open_aggregator(tmp_path / "one" / "state", **settings)
    outputs_1 = [first.aggregate(n, uploads(first, first_layout, seed=n, number=n)) for n in (1, 2)]
    replay = iter(list(recorded))
    monkeypatch.setattr(private, "release", lambda *args: next(replay))
    second, second_layout = open_aggregator(tmp_path / "two" / "state", **settings)
    outputs_2 = [second.aggregate(n, uploads(second, second_layout, seed=10 + n, number=n)) for n in (1, 2)]

    for output_1, output_2 in zip(outputs_1, outputs_2):
        assert output_1.artifacts and [a.sha256 for a in output_1.artifacts] == [a.sha256 for a in output_2.artifacts]
        assert {a.kind for a in output_1.artifacts} >= {"global", "merged", "lora"}  # round 2 starts warm from it
        assert output_1.validation_loss == output_2.validation_loss is not None
        assert math.isnan(output_1.aggregation_error)  # nothing measured against the clear updates
        assert all(math.isnan(d.norm) and math.isnan(d.clip_factor) for d in output_1.decisions)
    for relative in ("adapter/adapter_model.safetensors", "model.safetensors"):
        assert ((first_layout.root / outputs_1[-1].checkpoint / relative).read_bytes()
                == (second_layout.root / outputs_2[-1].checkpoint / relative).read_bytes())


def test_without_dp_the_same_round_is_the_clear_merge(tmp_path):
    # The switch: without dp settings the release is never reached and the error is measured.
    aggregator, layout = open_aggregator(tmp_path / "state", method="flora")
    output = aggregator.aggregate(1, uploads(aggregator, layout, seed=1))
    assert output.aggregation_error < 1e-5 and all(d.norm > 0 for d in output.decisions)


def test_under_dp_an_update_of_any_finite_size_is_clipped_not_refused_or_blamed(tmp_path):
    # A finite update whose product overflows float32: without DP a failed round blames it (it
    # fails merged alone); under DP the round clips it to C like any other and nothing is blamed,
    # so whether a client takes part never depends on the size of what it trained.
    sigma, clip = 0.01, 0.5
    for private_run in (False, True):
        dp = {"dp_noise_multiplier": sigma, "dp_clip_norm": clip} if private_run else {}
        aggregator, layout = open_aggregator(tmp_path / str(private_run) / "state", method="flora", **dp)
        submissions = uploads(aggregator, layout, seed=1)
        huge = {n: LoraPair(torch.full((1, d_in), 1e20), torch.full((d_out, 1), 1e20)) for n, (d_out, d_in) in aggregator.shapes.items()}
        submissions[-1] = stored(layout, CLIENTS[-1][0], CLIENTS[-1][2], LoraAdapter(huge, 2.0), 1)
        assert aggregator.upload_norm_limit == (math.inf if private_run else aggregator.max_update_norm)
        if not private_run:
            assert set(aggregator.faulty(submissions)) == {CLIENTS[-1][0]}
            continue
        assert aggregator.faulty(submissions) == {}
        output = aggregator.aggregate(1, submissions)
        served, _ = read_update(layout.absolute(output.artifacts[0].path), aggregator.shapes)
        norm = math.sqrt(sum(float(module_delta(u, torch.float64).square().sum()) for u in served.values()))
        entries = sum(d_out * d_in for d_out, d_in in aggregator.shapes.values())
        std = sigma * clip * max(output.weights)
        assert output.weights[-1] > 0 and norm <= clip + 3 * std * math.sqrt(entries)  # its share clipped to C


def test_the_round_log_line_says_why_no_aggregation_error_is_measured():
    assert error_phrase(math.nan, private=True, secure=True) == "aggregation error n/a (private release)"
    assert error_phrase(math.nan, private=False, secure=True) == "aggregation error n/a (secure aggregation)"
    assert error_phrase(2.5e-7, private=False, secure=False) == "aggregation error 2.5e-07"


# --- real processes --------------------------------------------------------------------------


def joined(server) -> tuple[ScriptedClient, list[ScriptedClient]]:
    """An operator and three clients of ranks 4, 2 and 1 (alpha 2 r: scaling 2), joined to ``server``."""
    operator = ScriptedClient(server.address, "operator", token=OPERATOR_TOKEN)
    base_hash = operator.status().run.base_model_hash
    clients = [ScriptedClient(server.address, name, rank=rank, alpha=2.0 * rank) for name, rank in (("a", 4), ("b", 2), ("c", 1))]
    for client in clients:
        client.join(base_hash)
    return operator, clients


@pytest.mark.slow
def test_a_private_run_serves_the_clear_aggregate_plus_noise_of_the_announced_scale(tmp_path):
    sigma, clip = 0.5, 20.0  # the updates' norms (6-13) are below C: nothing is clipped
    flags = ("--min-clients", "3", "--rounds", "1", "--long-poll-s", "0.5", "--weighting", "uniform",
             "--operator-token", OPERATOR_TOKEN,
             "--dp-noise-multiplier", str(sigma), "--dp-clip-norm", str(clip), "--dp-release", "dense")
    with running_server(tmp_path / "state", *flags) as server:
        operator, clients = joined(server)
        for client in clients:
            client.wait_for_train()
        adapters = [client.adapter(seed=k) for k, client in enumerate(clients)]
        assert max(update_norm(a) for a in adapters) < clip
        for client, adapter in zip(clients, adapters):
            assert client.submit(make_update(adapter, client.alpha, 1), 1).accepted
        operator.wait_for_version(1)
        shapes = target_shapes(clients[0].spec)
        served, _ = read_update(artifacts(clients[0].fetch(transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE, 0, 1))[1], shapes)
        history = [json.loads(line) for line in (tmp_path / "state" / "history.jsonl").read_text().splitlines()]
        operator.close()
    weights = client_weights([10, 10, 10], "uniform")
    noise_sq, entries = 0.0, 0
    for name in shapes:
        clear = sum(p * a.delta(name, torch.float64) for p, a in zip(weights, adapters))
        noise_sq += float((module_delta(served[name], torch.float64) - clear).square().sum())
        entries += clear.numel()
    std = sigma * clip / 3  # sigma C max_k p_k
    assert 0.9 * std < math.sqrt(noise_sq / entries) < 1.1 * std
    last = history[-1]
    assert last["aggregation_error"] is None
    assert all(c["norm"] is None and c["clip_factor"] is None for c in last["clients"])


@pytest.mark.slow
def test_flexlora_runs_privately_over_grpc_and_updates_above_max_update_norm_are_accepted(tmp_path):
    # Two rounds (the second from warm starts, as a client derives them from GLOBAL_LORA), every
    # update's change above max_update_norm and below C: accepted, nothing clipped, so each
    # round's global LoRA is the clients' average product plus the announced noise: of the
    # announced scale, and with no part along the average product or the public starts (which a
    # release that lost or doubled the starts would leave, far beyond the noise's spread).
    sigma, clip = 0.5, 10.0
    flags = ("--method", "flexlora", "--min-clients", "3", "--rounds", "2", "--long-poll-s", "0.5",
             "--weighting", "uniform", "--operator-token", OPERATOR_TOKEN, "--max-update-norm", "0.001",
             "--dp-noise-multiplier", str(sigma), "--dp-clip-norm", str(clip), "--dp-release", "dense")
    method, lora = get_method("flexlora"), transfer_pb2.ARTIFACT_KIND_GLOBAL_LORA
    with running_server(tmp_path / "state", *flags) as server:
        operator, clients = joined(server)
        spec, shapes = clients[0].spec, target_shapes(clients[0].spec)
        assert (spec.dp_noise_multiplier, spec.dp_clip_norm, spec.max_update_norm) == (sigma, clip, 0.001)
        kept, rounds = None, []
        for number in (1, 2):
            trained, starts = [], []
            for k, client in enumerate(clients):
                assert client.wait_for_train().round == number
                init = method.start(kept, client.rank, 2.0).init
                starts += [] if init is None else [init]
                trained.append(moved(init, client.adapter(seed=10 * number + k), 0.05))
                assert spec.max_update_norm < change_norm(trained[-1], init) < clip / 2  # above the bound, not clipped
                assert client.submit(make_update(trained[-1], client.alpha, number), number).accepted
            operator.wait_for_version(number)
            kept, _ = read_adapter(artifacts(clients[0].fetch(lora, number, number))[number], shapes)
            average = {n: sum(u.delta(n, torch.float64) for u in trained) / 3 for n in shapes}
            public = {n: sum(u.delta(n, torch.float64) for u in starts) / 3 for n in shapes} if starts else None
            rounds.append(({n: kept.delta(n, torch.float64) - average[n] for n in shapes}, average, public))
        history = [json.loads(line) for line in (tmp_path / "state" / "history.jsonl").read_text().splitlines()]
        output = server.output()
        operator.close()
    assert "aggregation error nan" not in output
    assert "round 2 committed: version 2, 3 clients" in output and "aggregation error n/a (private release)" in output
    std = sigma * clip / 3  # sigma C max_k p_k
    for noise, average, public in rounds:
        measured = math.sqrt(sum(float(n.square().sum()) for n in noise.values()) / sum(n.numel() for n in noise.values()))
        assert 0.9 * std < measured < 1.1 * std
        for direction in (average, public) if public is not None else (average,):
            along = sum(float((noise[n] * direction[n]).sum()) for n in shapes) / math.sqrt(
                sum(float(direction[n].square().sum()) for n in shapes))
            assert abs(along) < 6 * std  # N(0, std^2) for noise alone
    assert [h["aggregation_error"] for h in history[-2:]] == [None, None]
    assert all(c["norm"] is None for h in history[-2:] for c in h["clients"])


def moved(init: LoraAdapter | None, step: LoraAdapter, size: float) -> LoraAdapter:
    """A client's trained LoRA: its start's factors plus ``size`` times ``step``'s (from a fresh start, zero factors)."""
    pairs = {n: LoraPair(size * a, size * b) for n, (a, b) in step.pairs.items()}
    if init is not None:
        pairs = {n: LoraPair(a + pairs[n].a, b + pairs[n].b) for n, (a, b) in init.pairs.items()}
    return LoraAdapter(pairs, step.scaling)
