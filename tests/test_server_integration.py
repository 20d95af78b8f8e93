"""The real flora-server process, driven call by call by a scripted flora.v1 client.

Every refusal is checked for its exact status code and for leaving the run untouched; every
accepted round is checked against the foundation's maths (flora_stack, fedit_average,
zeropad_average) and the merged checkpoint against base + B_g A_g.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save as save_bytes

from flora.common.aggregation import fedit_average, flora_stack, zeropad_average
from flora.common.basemodel import BUILTIN_MODEL, load_model
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.merge import merged_weights, module_weights
from flora.common.payload import PayloadMeta, read_adapter, read_update, read_weights
from flora.common.update import is_factors, module_delta, module_numel
from flora.common.weights import client_weights
from flora.common.lora import pad_rank, seeded_lora
from flora.v1 import coordinator_pb2 as pb
from flora.v1 import run_pb2, transfer_pb2
from harness import (
    OPERATOR_TOKEN,
    ScriptedClient,
    artifacts,
    make_update,
    raw_messages,
    running_server,
    sha256,
    target_shapes,
)

pytestmark = pytest.mark.slow

ENROLMENT = "enrolment-token-0123456789"
ADAPTER, LORA, MERGED = (transfer_pb2.ARTIFACT_KIND_GLOBAL_ADAPTER, transfer_pb2.ARTIFACT_KIND_GLOBAL_LORA,
                         transfer_pb2.ARTIFACT_KIND_MERGED_MODULES)
UPDATE = transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    """The status code a call fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    return error.value.code()


def operator(server) -> ScriptedClient:
    return ScriptedClient(server.address, "operator", token=OPERATOR_TOKEN)


def health_of(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


# --- Join, authentication, NextTask WAIT, Leave, Status, health ----------------------------------


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    flags = ("--enrollment-token", ENROLMENT, "--operator-token", OPERATOR_TOKEN, "--min-clients", "100", "--long-poll-s", "0.5")
    with running_server(tmp_path_factory.mktemp("gated") / "state", *flags) as server:
        yield server


def test_health_reports_serving(gated):
    assert health_of(gated.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_of(gated.address, "flora.v1.Coordinator") == health_pb2.HealthCheckResponse.SERVING


def test_join_needs_the_enrolment_token_and_rejoins_keep_the_id(gated):
    base_hash = operator(gated).status().run.base_model_hash
    alice = ScriptedClient(gated.address, "alice")
    assert code_of(alice.join, base_hash) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(alice.join, base_hash, token="wrong-token-0123456789") == grpc.StatusCode.UNAUTHENTICATED
    reply = alice.join(base_hash, token=ENROLMENT)
    assert reply.client_id and reply.client_token != ENROLMENT and reply.global_version == 0
    assert reply.run.method == run_pb2.AGGREGATION_METHOD_FLORA and len(reply.run.target_modules) == 8
    again = alice.join(base_hash, token=reply.client_token)
    assert (again.client_id, again.client_token) == (reply.client_id, reply.client_token)
    clash = ScriptedClient(gated.address, "alice")
    with pytest.raises(grpc.RpcError) as error:
        clash.join(base_hash, token=ENROLMENT)
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS and "token" in error.value.details()
    # Another joined client's token under a new name: INVALID_ARGUMENT, as PROTOCOL.md says.
    mallory = ScriptedClient(gated.address, "mallory")
    with pytest.raises(grpc.RpcError) as error:
        mallory.join(base_hash, token=reply.client_token)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "belongs to client 'alice', not 'mallory'" in error.value.details()


@pytest.mark.parametrize(
    ("name", "changes", "code"),
    [
        ("bad name!", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("x" * 65, {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("r0", {"rank": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        ("r999", {"rank": 999}, grpc.StatusCode.INVALID_ARGUMENT),
        ("nan", {"alpha": math.nan}, grpc.StatusCode.INVALID_ARGUMENT),
        ("rule", {"rule": run_pb2.SCALING_RULE_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_join_refuses_bad_capabilities(gated, name, changes, code):
    base_hash = operator(gated).status().run.base_model_hash
    client = ScriptedClient(gated.address, name, **changes)
    assert code_of(client.join, base_hash, token=ENROLMENT) == code


def test_join_refuses_another_base_model(gated):
    run_hash = operator(gated).status().run.base_model_hash
    with pytest.raises(grpc.RpcError) as error:
        ScriptedClient(gated.address, "other").join("0" * 64, token=ENROLMENT)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "000000000000" in error.value.details() and run_hash[:12] in error.value.details()


def test_calls_without_a_valid_token_are_unauthenticated(gated):
    anonymous = ScriptedClient(gated.address, "nobody")
    assert code_of(anonymous.next_task) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(anonymous.status) == grpc.StatusCode.UNAUTHENTICATED
    anonymous.token = "not-a-token"
    assert code_of(anonymous.next_task) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(anonymous.fetch, ADAPTER, 0, 0) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(anonymous.submit, b"x" * 10, 1) == grpc.StatusCode.UNAUTHENTICATED


def test_next_task_waits_and_leave_is_reported(gated):
    base_hash = operator(gated).status().run.base_model_hash
    dave = ScriptedClient(gated.address, "dave")
    dave.join(base_hash, token=ENROLMENT)
    task = dave.next_task(max_wait_ms=0)
    assert task.WhichOneof("kind") == "wait" and "waiting for clients" in task.wait.reason
    assert dave.next_task(max_wait_ms=5000).WhichOneof("kind") == "wait"  # held at most long_poll_s
    heartbeat = dave.stub.Heartbeat(pb.HeartbeatRequest(round=1), metadata=dave.metadata(), timeout=10)
    assert (heartbeat.open_round, heartbeat.round_closed) == (0, True)
    dave.stub.Leave(pb.LeaveRequest(reason="test"), metadata=dave.metadata(), timeout=10)
    states = {c.client_name: c.state for c in operator(gated).status().clients}
    assert states["dave"] == "left"
    assert "left" in dave.next_task().wait.reason
    dave.join(base_hash, token=dave.token)
    assert {c.client_name: c.state for c in dave.status().clients}["dave"] == "connected"


def test_sigterm_reports_not_serving_and_exits_cleanly(tmp_path):
    flags = ("--shutdown-grace-s", "2", "--long-poll-s", "30", "--operator-token", OPERATOR_TOKEN)
    with running_server(tmp_path / "state", *flags) as server, grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        client = ScriptedClient(server.address, "eve")
        client.join(operator(server).status().run.base_model_hash)
        joined_at = last_seen(server, "eve")
        time.sleep(0.01)  # so that the poll's arrival shows as a later last_seen
        answers = []
        poll = threading.Thread(target=lambda: answers.append(client.next_task(max_wait_ms=30000)))
        poll.start()
        while last_seen(server, "eve") == joined_at:  # until the long-poll is being held
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        poll.join(30)
        assert answers and "shutting down" in answers[0].wait.reason  # the long-poll was released
        assert server.process.wait(60) == 0
        assert "stopped cleanly" in server.output()


def last_seen(server, name: str) -> int:
    return next(c.last_seen_unix_ms for c in operator(server).status().clients if c.client_name == name)


# --- a flora run: uploads refused and accepted, the global adapter, the merged checkpoint -------


class Run:
    """A started flora server with three scripted clients; round 1 open for alice and bob only."""

    def __init__(self, server):
        self.server = server
        self.state_dir = Path(server.state_dir)
        self.operator = operator(server)
        base_hash = self.operator.status().run.base_model_hash
        self.alice = ScriptedClient(server.address, "alice", rank=4, alpha=8.0, num_examples=10)
        self.bob = ScriptedClient(server.address, "bob", rank=2, alpha=4.0, num_examples=30, rule=run_pb2.SCALING_RULE_RSLORA)
        self.alice.join(base_hash)
        self.bob.join(base_hash)
        self.alice.wait_for_train()
        self.carol = ScriptedClient(server.address, "carol", rank=8, alpha=16.0)
        self.carol.join(base_hash)  # after round 1 opened: not selected
        self.shapes = target_shapes(self.alice.spec)
        self.adapters: dict[int, dict[str, LoraAdapter]] = {}

    def snapshot(self):
        """Everything a refused upload must leave as it was."""
        status = self.operator.status()
        files = sorted(str(p.relative_to(self.state_dir)) for p in (self.state_dir / "updates").rglob("*") if p.is_file())
        return (status.global_version, status.round.round, status.round.state, list(status.round.submitted),
                sorted((c.client_name, c.last_submitted_round) for c in status.clients), files,
                sorted((self.state_dir / "tmp").iterdir()))

    def complete_round(self, number: int) -> None:
        """Every selected client uploads a valid update; wait for the new version."""
        self.adapters[number] = {}
        selected = set(self.operator.status().round.selected)
        for seed, client in enumerate(c for c in (self.alice, self.bob, self.carol) if c.client_id in selected):
            adapter = client.adapter(seed=100 * number + seed)
            reply = client.submit(make_update(adapter, client.alpha, number, rule_name(client)), number)
            assert reply.accepted
            self.adapters[number][client.client_id] = adapter
        self.operator.wait_for_version(number)

    def expected_global(self, number: int) -> LoraAdapter:
        """flora_stack of what was submitted, in the server's order (by client id)."""
        ordered = sorted(self.adapters[number].items())
        examples = {self.alice.client_id: 10, self.bob.client_id: 30}
        weights = client_weights([examples[cid] for cid, _ in ordered])
        return flora_stack([a for _, a in ordered], weights)


def rule_name(client: ScriptedClient) -> str:
    return "rslora" if client.rule == run_pb2.SCALING_RULE_RSLORA else "standard"


@pytest.fixture(scope="module")
def flora_run(tmp_path_factory):
    flags = ("--min-clients", "2", "--rounds", "2", "--operator-token", OPERATOR_TOKEN, "--checkpoint-every", "1",
             "--max-update-bytes", "200000", "--long-poll-s", "0.5", "--local-steps", "5", "--catchup-versions", "1")
    with running_server(tmp_path_factory.mktemp("flora") / "state", *flags) as server:
        yield Run(server)


def nan_payload(adapter: LoraAdapter, alpha: float) -> bytes:
    """A well-formed payload with one NaN (encode_adapter refuses to write one)."""
    tensors = {}
    for name, (a, b) in adapter.pairs.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a.clone(), b.clone()
    next(iter(tensors.values()))[0, 0] = math.nan
    meta = PayloadMeta("client_update", rank=adapter.rank, alpha=alpha, scaling_rule="standard", round=1)
    return save_bytes(tensors, metadata=meta.to_metadata())


def broken_payloads(run: Run) -> dict[str, tuple[bytes, dict]]:
    """Invalid uploads of alice for round 1: (payload, header overrides) by case name."""
    good_adapter = run.alice.adapter(seed=1)
    good = make_update(good_adapter, 8.0, 1)
    pairs = dict(good_adapter.pairs)
    first = sorted(pairs)[0]
    missing = LoraAdapter({n: p for n, p in pairs.items() if n != first}, good_adapter.scaling)
    misshapen = LoraAdapter({**pairs, first: LoraPair(pairs[first].a[:, :-1], pairs[first].b)}, good_adapter.scaling)
    rank3 = run.alice.adapter(seed=2)
    rank3 = LoraAdapter({n: LoraPair(a[:3], b[:, :3]) for n, (a, b) in rank3.pairs.items()}, 8.0 / 3)
    return {
        "missing module": (make_update(missing, 8.0, 1), {}),
        "wrong shape": (make_update(misshapen, 8.0, 1), {}),
        "header rank differs from Join": (good, {"rank": 8}),
        "payload rank differs from header": (make_update(rank3, 8.0, 1), {}),
        "metadata round differs": (make_update(good_adapter, 8.0, 2), {}),
        "NaN": (nan_payload(good_adapter, 8.0), {}),
        "not safetensors": (b"\x00" * 64, {}),
        "bad sha256": (good, {"sha256": sha256(b"something else")}),
        "truncated stream": (good[: len(good) // 2], {"total_bytes": len(good), "sha256": sha256(good)}),
        "over max bytes": (good, {"total_bytes": 300_000}),
        "zero examples": (good, {"num_examples": 0}),
        "wrong base version": (good, {"base_version": 1}),
        "wrong round": (good, {"round": 2, "base_version": 1}),
    }


EXPECTED_CODES = {
    "missing module": grpc.StatusCode.INVALID_ARGUMENT,
    "wrong shape": grpc.StatusCode.INVALID_ARGUMENT,
    "header rank differs from Join": grpc.StatusCode.INVALID_ARGUMENT,
    "payload rank differs from header": grpc.StatusCode.INVALID_ARGUMENT,
    "metadata round differs": grpc.StatusCode.INVALID_ARGUMENT,
    "NaN": grpc.StatusCode.INVALID_ARGUMENT,
    "not safetensors": grpc.StatusCode.INVALID_ARGUMENT,
    "bad sha256": grpc.StatusCode.DATA_LOSS,
    "truncated stream": grpc.StatusCode.DATA_LOSS,
    "over max bytes": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "zero examples": grpc.StatusCode.INVALID_ARGUMENT,
    "wrong base version": grpc.StatusCode.FAILED_PRECONDITION,
    "wrong round": grpc.StatusCode.FAILED_PRECONDITION,
}


def test_invalid_uploads_get_their_status_and_change_nothing(flora_run):
    run = flora_run
    before = run.snapshot()
    for case, (payload, overrides) in broken_payloads(run).items():
        round_number = overrides.pop("round", 1)
        header = run.alice.header(payload, round_number, **overrides)
        with pytest.raises(grpc.RpcError) as error:
            run.alice.submit_messages(raw_messages(header, payload, 4096))
        assert error.value.code() == EXPECTED_CODES[case], f"{case}: {error.value.details()}"
        assert run.snapshot() == before, case
    piece_first = [transfer_pb2.UpdateChunk(piece=transfer_pb2.UpdatePiece(offset=0, data=b"x"))]
    assert code_of(run.alice.submit_messages, iter(piece_first)) == grpc.StatusCode.INVALID_ARGUMENT
    carol_update = make_update(run.carol.adapter(seed=3), 16.0, 1)
    assert code_of(run.carol.submit, carol_update, 1) == grpc.StatusCode.FAILED_PRECONDITION  # not selected
    assert run.snapshot() == before


def test_heartbeat_tells_who_still_trains(flora_run):
    run = flora_run
    if run.operator.status().global_version:
        pytest.skip("round 1 already closed by an earlier test")
    alice = run.alice.stub.Heartbeat(pb.HeartbeatRequest(round=1), metadata=run.alice.metadata(), timeout=10)
    carol = run.carol.stub.Heartbeat(pb.HeartbeatRequest(round=1), metadata=run.carol.metadata(), timeout=10)
    assert (alice.open_round, alice.round_closed, carol.round_closed) == (1, False, True)


@pytest.fixture(scope="module")
def round_one(flora_run):
    """Round 1 with a duplicate and a conflicting upload along the way."""
    run = flora_run
    adapter = run.alice.adapter(seed=100)
    payload = make_update(adapter, 8.0, 1)
    first = run.alice.submit(payload, 1, chunk_size=1000)
    again = run.alice.submit(payload, 1)
    assert (first.accepted, first.duplicate, again.accepted, again.duplicate) == (True, False, True, True)
    assert code_of(run.alice.submit, make_update(run.alice.adapter(seed=5), 8.0, 1), 1) == grpc.StatusCode.ALREADY_EXISTS
    status = run.operator.status()
    assert list(status.round.submitted) == [run.alice.client_id] and status.global_version == 0
    bob_adapter = run.bob.adapter(seed=101)
    assert run.bob.submit(make_update(bob_adapter, 4.0, 1, "rslora"), 1).accepted
    run.adapters[1] = {run.alice.client_id: adapter, run.bob.client_id: bob_adapter}
    run.operator.wait_for_version(1)
    return run


def test_the_global_update_is_the_canonical_aggregate_and_reveals_no_update(round_one):
    run = round_one
    chunks = run.alice.fetch(UPDATE, 0, 1)
    assert {c.kind for c in chunks} == {UPDATE}
    payload = artifacts(chunks)[1]
    served, meta = read_update(payload, run.shapes)
    expected = run.expected_global(1)
    assert (meta.kind, meta.version) == ("global_update", 1)
    for name, (d_out, d_in) in run.shapes.items():
        part = served[name]
        torch.testing.assert_close(module_delta(part), expected.delta(name), rtol=0, atol=1e-6)
        assert module_numel(part) == min(6 * (d_out + d_in), d_out * d_in)  # rank 6 = 4 + 2, the smaller form
        if is_factors(part):
            for adapter in run.adapters[1].values():
                a_k, b_k = adapter.pairs[name]
                for start in range(part.a.shape[0] - adapter.rank + 1):
                    assert not torch.allclose(part.b[:, start : start + adapter.rank], b_k, rtol=1e-3, atol=1e-6)
                    assert not torch.allclose(part.a[start : start + adapter.rank], a_k, rtol=1e-3, atol=1e-6)
    stack_bytes = 4 * 6 * sum(d_out + d_in for d_out, d_in in run.shapes.values())
    assert len(payload) <= stack_bytes + 4096  # never larger than the stack (4096: the header's allowance)
    resumed = run.alice.fetch(UPDATE, 0, 1, offset=1000)
    assert resumed[0].offset == 1000 and b"".join(c.data for c in resumed) == payload[1000:]
    assert run.alice.fetch(UPDATE, 1, 1) == []
    assert code_of(run.alice.fetch, UPDATE, 0, 5) == grpc.StatusCode.OUT_OF_RANGE
    assert code_of(run.alice.fetch, UPDATE, 0, 1, offset=len(payload) + 1) == grpc.StatusCode.OUT_OF_RANGE
    assert code_of(run.alice.fetch, LORA, 0, 1) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(run.alice.fetch, ADAPTER, 0, 1) == grpc.StatusCode.FAILED_PRECONDITION  # the stack is never served
    # The stacked factors exist nowhere but in the accepted updates.
    assert not any("global_adapter" in p.read_bytes()[:4096].decode("latin-1")
                   for p in run.state_dir.rglob("*.safetensors") if "updates" not in p.parts)
    # One version behind, the update is smaller than the merged modules: it is what is sent.
    assert {c.kind for c in run.alice.fetch(UPDATE, 0, 1, allow_merged=True)} == {UPDATE}


def test_the_merged_checkpoint_is_base_plus_the_global_update(round_one):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = round_one
    checkpoint = run.state_dir / "checkpoints" / "v000001"
    merged = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    base = load_model(BUILTIN_MODEL)
    expected = merged_weights(module_weights(base, list(run.shapes)), run.expected_global(1))
    actual = module_weights(merged, list(run.shapes))
    for name in run.shapes:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6)
    weights, _ = read_weights(artifacts(run.alice.fetch(MERGED, 0, 1))[1], run.shapes)
    for name in run.shapes:
        torch.testing.assert_close(weights[name], actual[name], rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(base, checkpoint / "adapter").eval()
    tokens = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, merged(tokens).logits, rtol=1e-4, atol=1e-5)


def test_the_run_finishes_with_a_history_line_per_round(round_one):
    run = round_one
    train = run.alice.wait_for_train()
    assert (train.round, train.required_version, train.hints.max_steps) == (2, 1, 5)
    late = make_update(run.alice.adapter(seed=7), 8.0, 1)
    assert code_of(run.alice.submit, late, 1) == grpc.StatusCode.FAILED_PRECONDITION
    replay = make_update(run.adapters[1][run.alice.client_id], 8.0, 1)
    assert run.alice.submit(replay, 1).duplicate  # a retry of an accepted upload stays acknowledged
    run.complete_round(2)
    assert run.alice.next_task().finished.final_version == 2
    assert code_of(run.alice.fetch, MERGED, 0, 1) == grpc.StatusCode.FAILED_PRECONDITION  # only the latest
    # Catch-up without replay: two versions behind is more than --catchup-versions 1.
    merged = run.alice.fetch(UPDATE, 0, 2, allow_merged=True)
    assert {(c.kind, c.version) for c in merged} == {(MERGED, 2)}
    assert artifacts(merged)[2] == artifacts(run.alice.fetch(MERGED, 0, 2))[2]
    assert {(c.kind, c.version) for c in run.alice.fetch(UPDATE, 1, 2, allow_merged=True)} == {(UPDATE, 2)}
    assert {c.kind for c in run.alice.fetch(UPDATE, 0, 2)} == {UPDATE}  # a client that cannot take merged modules
    status = run.operator.status()
    assert status.state == "finished" and status.global_version == 2
    states = {c.client_id: c.state for c in status.clients}  # told FINISHED: done, never "lost" once it exits
    assert states[run.alice.client_id] == "finished" and states[run.bob.client_id] != "finished"
    history = [json.loads(line) for line in (run.state_dir / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2]
    first = history[0]
    assert first["num_clients"] == 2 and first["examples"] == 40 and first["global_rank"] == 6
    assert first["aggregation_error"] < 1e-5 and first["train_loss"] == pytest.approx(1.5)
    assert first["bytes_in"] > 0 and first["checkpoint"] == "checkpoints/v000001"
    downlink = first["downlink"]
    assert downlink["bytes"] == (run.state_dir / "downlink" / "v000001.safetensors").stat().st_size
    assert (downlink["factor_modules"], downlink["dense_modules"], downlink["rank_min"], downlink["rank_max"]) == (8, 0, 6, 6)
    assert downlink["retained_energy"] == pytest.approx(1.0) and downlink["remainder_norm"] == 0.0
    assert "factorize" in first["seconds"]
    peft_config = json.loads((run.state_dir / "checkpoints" / "v000002" / "adapter" / "adapter_config.json").read_text())
    assert peft_config["r"] == 6 + 14  # round 2 adds carol (4 + 2 + 8); never beyond min(d_out, d_in) = 64
    assert sorted(c["name"] for c in first["clients"]) == ["alice", "bob"]
    assert (run.state_dir / "checkpoints" / "v000002" / "model.safetensors").exists()


# --- fedit and zeropad: a persistent global LoRA ------------------------------------------------


def write_validation_data(path: Path) -> Path:
    records = [{"instruction": f"Repeat {i}", "input": "", "output": f"{i} {i}"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("method", ["fedit", "zeropad"])
def test_baselines_serve_and_replace_a_global_lora(tmp_path, method):
    validation = write_validation_data(tmp_path / "validation.jsonl")
    flags = ("--method", method, "--lora-rank", "4", "--lora-alpha", "8", "--min-clients", "2", "--rounds", "1",
             "--operator-token", OPERATOR_TOKEN, "--long-poll-s", "0.5", "--seed", "11", "--validation-data", str(validation))
    with running_server(tmp_path / "state", *flags) as server:
        base_hash = operator(server).status().run.base_model_hash
        second_rank = 4 if method == "fedit" else 2
        a = ScriptedClient(server.address, "a", rank=4, alpha=8.0, num_examples=10)
        b = ScriptedClient(server.address, "b", rank=second_rank, alpha=2.0 * second_rank, num_examples=30)
        wrong = ScriptedClient(server.address, "wrong", rank=4 if method == "fedit" else 8, alpha=4.0)
        assert code_of(wrong.join, base_hash) == grpc.StatusCode.FAILED_PRECONDITION
        a.join(base_hash)
        assert a.spec.required_scaling == 2.0 and a.spec.global_lora_rank == 4
        first, second = artifacts(a.fetch(LORA, 0, 0))[0], artifacts(a.fetch(LORA, 0, 0))[0]
        assert first == second
        initial, meta = read_adapter(first, target_shapes(a.spec))
        expected_initial = seeded_lora(target_shapes(a.spec), 4, 2.0, 11)
        assert meta.kind == "global_lora" and initial.scaling == 2.0
        for name, (lora_a, lora_b) in initial.pairs.items():
            assert torch.equal(lora_a, expected_initial.pairs[name].a) and not lora_b.any()
        assert code_of(a.fetch, ADAPTER, 0, 0) == grpc.StatusCode.FAILED_PRECONDITION
        b.join(base_hash)
        assert a.wait_for_train().global_lora_version == 0
        updates = {}
        for seed, client in enumerate((a, b)):
            updates[client.client_id] = client.adapter(seed=seed)
            assert client.submit(make_update(updates[client.client_id], client.alpha, 1), 1).accepted
        a.wait_for_version(1)
        served, _ = read_adapter(artifacts(a.fetch(LORA, 0, 1))[1], target_shapes(a.spec))
        ordered = sorted(updates.items())
        weights = client_weights([10 if cid == a.client_id else 30 for cid, _ in ordered])
        expected = (fedit_average if method == "fedit" else zeropad_average)([u for _, u in ordered], weights)
        expected = pad_rank(expected, 4)
        for name in served.pairs:
            torch.testing.assert_close(served.pairs[name].a, expected.pairs[name].a, rtol=0, atol=1e-7)
            torch.testing.assert_close(served.pairs[name].b, expected.pairs[name].b, rtol=0, atol=1e-7)
        assert (tmp_path / "state" / "checkpoints" / "v000001" / "adapter" / "adapter_config.json").exists()
        history = [json.loads(line) for line in (tmp_path / "state" / "history.jsonl").read_text().splitlines()]
        assert [h["round"] for h in history] == [0, 1]  # version 0 is evaluated too
        assert history[0]["validation_loss"] > 0 and history[1]["validation_loss"] != history[0]["validation_loss"]
        assert history[1]["aggregation_error"] > 0  # averaging factors is inexact: reported, not hidden


def test_a_finished_run_exits_after_lingering(tmp_path):
    flags = ("--rounds", "1", "--min-clients", "1", "--exit-after-finish-s", "0", "--operator-token", OPERATOR_TOKEN)
    with running_server(tmp_path / "state", *flags) as server:
        client = ScriptedClient(server.address, "solo")
        client.join(operator(server).status().run.base_model_hash)
        client.wait_for_train()
        assert client.submit(make_update(client.adapter(seed=1), client.alpha, 1), 1).accepted
        assert server.process.wait(60) == 0
        assert (tmp_path / "state" / "checkpoints" / "v000001" / "config.json").exists()
