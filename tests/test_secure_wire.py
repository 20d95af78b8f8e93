"""Secure aggregation's wire layer in one process: the server's ``SecureRounds`` driven by the
client's ``secure_stages`` over a loopback stand-in for the connection (no gRPC, no training).

The round's merged delta must equal the plain method's merge of the same updates, and hostile
or out-of-turn messages must be refused with the status a client would get, changing nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from flora.client import secure_stages
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import get_method
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.plan import plan_round
from flora.common.secagg.stream import masked_messages
from flora.common.secagg.wire import keys_digest, read_sketch, read_vector, sketch_bytes, sketch_size, vector_bytes
from flora.common.sketch import broadcast_basis
from flora.server.aggregator import RoundOutput
from flora.server.config import ServerSettings
from flora.server.errors import FailedPrecondition, InvalidArgument
from flora.server.layout import Layout
from flora.server.rounds import Round, RoundState
from flora.server.secure_round import SecureRounds, _label
from flora.server.store import Submission
from flora.v1 import run_pb2, secagg_pb2 as sa, transfer_pb2

SHAPES = {"m.k": (12, 10), "m.q": (64, 80)}  # one module small enough to travel dense, one sketched
RANKS = (4, 2, 1)
SCALING = 2.0


@dataclass
class FakeAggregator:
    """What SecureRounds asks of the aggregator; ``write_round`` keeps the result instead of writing."""

    shapes: dict = field(default_factory=lambda: dict(SHAPES))
    kept: LoraAdapter | None = None
    precision: torch.dtype = torch.float64
    max_update_norm: float = 1e3  # C: above every test change, so that nothing is clipped
    results: list = field(default_factory=list)
    layout: Layout = field(default_factory=lambda: Layout(Path(tempfile.mkdtemp(prefix="flora-secure-"))))

    def __post_init__(self) -> None:  # where SecureRounds saves the attempt: gone with the aggregator
        weakref.finalize(self, shutil.rmtree, self.layout.root, True)

    def write_round(self, number, result, decisions, error, seconds) -> RoundOutput:
        self.results.append((result, decisions))
        return RoundOutput([], [d.weight for d in decisions], error, 0, {}, None, None, seconds, decisions)


class Loopback:
    """The client's Connection, answering each call with the server's SecureRounds directly: on
    the event loop when one runs (the client's steps then run in a worker thread, as over gRPC)."""

    def __init__(self, secure: SecureRounds, client_id: str) -> None:
        self.secure, self.client_id, self.current = secure, client_id, None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _on_loop(self, handler, *args):
        if self.loop is None:
            return handler(*args)

        async def run():
            result = handler(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    def call(self, method: str, request, timeout=None):
        if method == "AdvertiseKeys":
            self.secure.advertise(self.client_id, self.current, request)
            return sa.SecureReply(accepted=True, message="ok")
        handler = {"ShareKeys": self.secure.share, "Unmask": self.secure.unmask}
        return self._on_loop(handler[method], self.client_id, request)

    def retrying(self, what: str, attempt):
        return attempt()

    def stream_in(self, method: str, messages):
        assert method == "SubmitMasked"
        return self._on_loop(self.secure.masked, self.client_id, _aiter(list(messages)))

    def stream_out(self, method: str, request):
        assert method == "FetchSecure"
        return iter(self._on_loop(lambda: list(self.secure.fetch(self.client_id, request))))


async def _aiter(items):
    for item in items:
        yield item


def update(rank: int, seed: int) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    return LoraAdapter({n: LoraPair(torch.randn(rank, i, generator=generator) * 0.3, torch.randn(o, rank, generator=generator) * 0.3)
                        for n, (o, i) in SHAPES.items()}, SCALING)


def spec(settings: ServerSettings | None = None) -> run_pb2.RunSpec:
    """The RunSpec's fields the secure stages read (the DP ones from ``settings``, when given)."""
    dp = settings is not None and settings.dp_enabled
    return run_pb2.RunSpec(target_modules=[run_pb2.TargetModule(name=n, out_features=o, in_features=i)
                                           for n, (o, i) in sorted(SHAPES.items())],
                           dp_clip_norm=settings.dp_clip_norm if dp else 0.0, dp_release=settings.dp_release if dp else "")


def setup(method: str = "flora", kept: LoraAdapter | None = None,
          deadline: float = 5.0, clients: int = 3, **extra) -> tuple[SecureRounds, FakeAggregator, Round, list[str]]:
    settings = ServerSettings(method=method, secure_aggregation=True, secure_stage_deadline_s=deadline, max_weight_share=1.0,
                              lora_rank=max(RANKS), lora_alpha=SCALING * max(RANKS), **extra)
    aggregator = FakeAggregator(kept=kept)
    ids = [f"c-{chr(ord('a') + k)}" for k in range(clients)]
    current = Round(number=1, attempt=1, state=RoundState.OPEN, selected=frozenset(ids))
    return SecureRounds(settings, aggregator, "run-1", lambda: None), aggregator, current, ids


def header(number: int, rank: int, examples: int) -> transfer_pb2.UpdateHeader:
    return transfer_pb2.UpdateHeader(round=number, rank=rank, alpha=SCALING * rank, num_examples=examples,
                                     scaling_rule=run_pb2.SCALING_RULE_STANDARD)


def secure_round(method: str, kept: LoraAdapter | None, updates: list[LoraAdapter], examples: list[int],
                 silent: dict[int, str] | None = None, gone: bool = False, deadline: float | None = None,
                 bound: float | None = None, **extra):
    """One round through SecureRounds and the clients' secure_stages: the result, decisions and
    output. ``silent`` {client k: step label}: that client answers nothing from that step on, and
    with ``gone`` the server is told it is gone when that step is handed out; ``deadline``: the
    stage deadline; ``bound``: seconds the whole aggregation may take; ``extra``: more server settings."""
    silent = silent or {}
    secure, aggregator, current, ids = setup(method, kept, deadline or (0.5 if silent else 5.0), len(updates), **extra)
    dropped: set[str] = set()
    sessions, links = {}, {}
    for client_id, u, n in zip(ids, updates, examples):
        links[client_id] = link = Loopback(secure, client_id)
        link.current = current
        info = secure.round_info(client_id, current)
        sessions[client_id] = secure_stages.advertise(link, spec(secure.settings), info, header(1, u.rank, n), u, kept,
                                                      get_method(method))

    def answer_steps() -> None:
        for client_id in ids:
            task = links[client_id]._on_loop(secure.task_for, client_id)
            if task is not None and silent.get(ids.index(client_id)) == _label(task):
                dropped.add(client_id)
                if gone:
                    links[client_id]._on_loop(secure.gone, client_id)
            if task is not None and client_id not in dropped:
                secure_stages.handle(links[client_id], sessions[client_id], task)

    def notify() -> None:
        loop = asyncio.get_running_loop()
        for link in links.values():
            link.loop = loop
        loop.run_in_executor(None, answer_steps)

    secure.notify = notify
    submissions = [Submission(round=1, client_id=c, sha256="0" * 64, path="", size=0, rank=u.rank, alpha=SCALING * u.rank,
                              scaling_rule=run_pb2.SCALING_RULE_STANDARD, num_examples=n, base_version=0, train_loss=None,
                              validation_loss=None, steps=1, train_seconds=0.0, received=0.0)
                   for c, u, n in zip(ids, updates, examples)]
    output = asyncio.run(asyncio.wait_for(secure.aggregate(1, submissions), bound))
    (result, decisions), = aggregator.results
    secure.notify = lambda: None
    return result, decisions, output, secure


def assert_same_adapter(got: LoraAdapter | None, want: LoraAdapter | None) -> None:
    assert (got is None) == (want is None)
    for name in SHAPES if want is not None else ():
        a, b = got.delta(name, torch.float64), want.delta(name, torch.float64)
        assert torch.allclose(a, b, rtol=0, atol=1e-9 * float(b.abs().max())), name


def warm_kept() -> LoraAdapter:
    """A global LoRA a warm round starts from (canonical factors of rank 6, scaling 1)."""
    generator = torch.Generator().manual_seed(99)
    return LoraAdapter({n: LoraPair(torch.randn(6, i, generator=generator, dtype=torch.float64),
                                    torch.randn(o, 6, generator=generator, dtype=torch.float64)) for n, (o, i) in SHAPES.items()}, 1.0)


def ffa_round() -> tuple[LoraAdapter, list[LoraAdapter]]:
    """ffa's seeded global LoRA and updates that trained B alone (A = its leading rows)."""
    kept = get_method("ffa").initial(SHAPES, max(RANKS), SCALING, 3)
    generator = torch.Generator().manual_seed(5)
    updates = [LoraAdapter({n: LoraPair(p.a[:r], torch.randn(p.b.shape[0], r, generator=generator) * 0.3)
                            for n, p in kept.pairs.items()}, SCALING) for r in RANKS]
    return kept, updates


def method_round(method: str) -> tuple[LoraAdapter | None, list[LoraAdapter]]:
    """The kept LoRA a round of ``method`` starts from, and three clients' trained updates."""
    if method == "ffa":
        return ffa_round()
    return (warm_kept() if method == "flora-warm" else None), [update(r, seed) for seed, r in enumerate(RANKS)]


@pytest.mark.parametrize("method", ["flora", "flora-warm", "ffa"])
def test_a_secure_round_over_the_wire_messages_merges_what_the_plain_method_merges(method):
    kept, updates = method_round(method)
    examples = [10, 20, 30]
    result, decisions, output, _ = secure_round(method, kept, updates, examples)
    weights = [n / sum(examples) for n in examples]
    assert [d.weight for d in decisions] == pytest.approx(weights)
    plain = get_method(method).merge(kept, updates, weights, torch.float64)
    assert_same_adapter(result.delta, plain.delta)
    assert_same_adapter(result.kept, plain.kept)
    stages = {"share", "mask1", "unmask1"} | ({"mask2", "unmask2"} if method != "ffa" else set())
    assert output.secure["survivors"] == 3 and set(output.secure["bytes_up"]) == {"advertise", *stages}


@pytest.mark.parametrize("method", ["flora", "flora-warm", "ffa"])
def test_a_client_that_drops_after_sharing_is_recovered_and_the_round_is_exact_over_the_survivors(method):
    kept, updates = method_round(method)
    examples = [10, 20, 30]
    result, decisions, output, secure = secure_round(method, kept, updates, examples, silent={0: "mask1"})
    assert [d.weight for d in decisions] == pytest.approx([0.0, 0.4, 0.6]) and decisions[0].rejected
    plain = get_method(method).merge(kept, updates[1:], [0.4, 0.6], torch.float64)
    assert_same_adapter(result.delta, plain.delta)
    assert_same_adapter(result.kept, plain.kept)
    assert (output.secure["survivors"], output.secure["dropouts_recovered"]) == (2, 1)
    # Back late with its masked input: refused, so the server never holds it beside the recovered key.
    with pytest.raises(FailedPrecondition, match="no mask step of stage 1"):
        asyncio.run(secure.masked("c-a", _aiter(masked_messages(1, 1, [np.zeros(1, dtype=np.uint64)], 4096))))


def test_a_client_that_drops_in_the_second_pass_fails_the_attempt_for_a_retry():
    with pytest.raises(SecAggError, match="the attempt starts over"):
        secure_round("flora", None, [update(r, seed) for seed, r in enumerate(RANKS)], [1, 1, 1], silent={2: "mask2"})


def test_fewer_survivors_than_the_threshold_fail_the_attempt_for_a_retry():
    with pytest.raises(SecAggError, match="below the threshold 2: the round must be retried"):
        secure_round("flora", None, [update(r, seed) for seed, r in enumerate(RANKS)], [1, 1, 1],
                     silent={0: "mask1", 1: "mask1"})


def test_advertisements_that_lie_about_the_sender_or_the_keys_are_refused_and_change_nothing():
    secure, _, current, ids = setup()
    info = secure.round_info(ids[0], current)
    link = Loopback(secure, ids[0])
    link.current = current
    session = secure_stages.advertise(link, spec(), info, header(1, 2, 5), update(2, 0), None, get_method("flora"))
    keys = sa.PublicKeys(client=1, channel_key=session.protocol.advertise().channel_key,
                         mask_keys=session.protocol.advertise().mask_keys)
    claims = header(1, 2, 5)
    claims.sha256 = keys_digest(keys.channel_key, keys.mask_keys)
    with pytest.raises(InvalidArgument, match="keys.client 1 is not this client's index 0"):
        secure.advertise(ids[0], current, sa.AdvertiseKeysRequest(claims=claims, keys=keys))  # claims another's index
    keys.client = 1
    claims.sha256 = "0" * 64
    with pytest.raises(InvalidArgument, match="sha256"):
        secure.advertise(ids[1], current, sa.AdvertiseKeysRequest(claims=claims, keys=keys))
    short = sa.PublicKeys(client=1, channel_key=b"\x01" * 31, mask_keys=keys.mask_keys)
    claims.sha256 = keys_digest(short.channel_key, short.mask_keys)
    with pytest.raises(InvalidArgument, match="public_key"):
        secure.advertise(ids[1], current, sa.AdvertiseKeysRequest(claims=claims, keys=short))
    with pytest.raises(FailedPrecondition, match="not selected"):
        secure.advertise("stranger", current, sa.AdvertiseKeysRequest(claims=claims, keys=keys))
    with pytest.raises(InvalidArgument, match="already advertised"):  # a replay of the first client's keys
        secure.advertise(ids[0], current, _replay(session))
    assert set(secure._attempt.server.adverts) == {0}


def _replay(session) -> sa.AdvertiseKeysRequest:
    advert = session.protocol.advertise()
    keys = sa.PublicKeys(client=advert.client, channel_key=advert.channel_key, mask_keys=advert.mask_keys)
    claims = header(1, 2, 5)
    claims.sha256 = keys_digest(keys.channel_key, keys.mask_keys)
    return sa.AdvertiseKeysRequest(claims=claims, keys=keys)


def test_answers_out_of_turn_are_refused_as_failed_precondition():
    secure, _, current, ids = setup()
    secure.round_info(ids[0], current)
    with pytest.raises(FailedPrecondition, match="no share step"):
        asyncio.run(secure.share(ids[0], sa.ShareKeysRequest(round=1)))
    with pytest.raises(FailedPrecondition, match="round 2 has no mask step"):
        asyncio.run(secure.masked(ids[0], _aiter(masked_messages(2, 1, [np.zeros(1, dtype=np.uint64)], 4096))))


def test_the_sketch_and_vector_layouts_round_trip_and_refuse_a_wrong_length():
    plan = plan_round(get_method("flora"), None, SHAPES, list(RANKS), [SCALING] * 3, [1 / 3] * 3, 1.0, 7)
    sketched = [m for m in plan.modules if not m.dense]
    q = {m.name: broadcast_basis(torch.randn(m.d_out, m.columns, dtype=torch.float64)) for m in sketched}
    data = sketch_bytes(plan, q)
    assert q and len(data) == sketch_size(plan) == sum(4 * m.d_out * m.columns for m in sketched)  # float32 on the wire
    assert all(torch.equal(read_sketch(plan, data)[n], q[n]) for n in q)  # the server's Q is the numbers sent
    name, first = sketched[0].name, sketched[0]
    assert np.array_equal(np.frombuffer(data, "<f4", first.d_out * first.columns).reshape(first.d_out, first.columns),
                          q[name].numpy().astype(np.float32))  # an outside client: little-endian float32, row-major
    with pytest.raises(ValueError, match="sketch is"):
        read_sketch(plan, data[:-4])
    vector = np.array([0, 1, 2**64 - 1], dtype=np.uint64)
    assert np.array_equal(read_vector(vector_bytes(vector), 3), vector)
    with pytest.raises(ValueError, match="24 bytes"):
        read_vector(vector_bytes(vector)[:-1], 3)


@pytest.mark.parametrize(("changes", "field"), [
    ({"method": "fedit"}, "method fedit cannot run under secure aggregation"),
    ({"clip_median_multiple": 2.0}, "clip_median_multiple cannot be used with secure_aggregation"),
    ({"reject_median_multiple": 3.0}, "reject_median_multiple cannot be used with secure_aggregation"),
    ({"min_clients": 1}, "needs at least 2 clients in every round"),
    ({"clients_per_round": "1"}, "needs at least 2 clients in every round"),
])
def test_settings_secure_aggregation_cannot_honour_are_refused_naming_why(changes, field):
    with pytest.raises(ValueError, match=field):
        ServerSettings(secure_aggregation=True, **changes)
    ServerSettings(**changes)  # the same settings without secure aggregation are fine


def test_flora_demo_passes_secure_aggregation_to_the_server_and_refuses_a_method_it_cannot_run(tmp_path, capsys):
    from flora.demo.cli import _server_args, parse_args
    from flora.demo.workspace import Workspace

    args = parse_args(["--secure-aggregation", "--method", "flora", "--workdir", str(tmp_path)])
    assert "--secure-aggregation" in _server_args(args, Workspace(tmp_path), [], args.client_ranks)
    assert "--secure-aggregation" not in _server_args(parse_args(["--workdir", str(tmp_path)]), Workspace(tmp_path), [], [4])
    with pytest.raises(SystemExit) as exited:
        parse_args(["--secure-aggregation", "--method", "fedit", "--ranks", "4"])
    assert exited.value.code == 2
    assert "--secure-aggregation with --method fedit" in capsys.readouterr().err


def test_metrics_count_secure_rounds_recoveries_and_the_steps_bytes():
    from flora.server.metrics import Metrics

    metrics = Metrics()
    secure = {"survivors": 2, "dropouts_recovered": 1, "bytes_up": {"share": 100, "mask1": 800},
              "bytes_down": {"mask1": 50}, "seconds": {"share": 0.2, "mask1": 1.5}}
    metrics._observe({"round": 1, "committed_unix": 1.0, "secure": secure})
    metrics._observe({"round": 2, "committed_unix": 2.0})  # a plain round counts nothing here
    value = metrics.registry.get_sample_value
    assert value("flora_secure_rounds_total") == 1 and value("flora_secure_dropouts_recovered_total") == 1
    assert value("flora_secure_bytes_total", {"direction": "up"}) == 900
    assert value("flora_secure_bytes_total", {"direction": "down"}) == 50
    assert value("flora_secure_stage_seconds_count", {"step": "mask1"}) == 1


def test_flora_admin_status_shows_each_secure_rounds_survivors_and_cost():
    from flora.server.admin.console import render_plain
    from flora.server.secure_round import secure_summary
    from flora.v1 import coordinator_pb2 as pb

    status = pb.StatusReply(run=run_pb2.RunSpec(secure_aggregation=True), state="running", global_version=1)
    status.recent_rounds.add(round=1, num_clients=3).secure.CopyFrom(secure_summary(
        {"survivors": 2, "dropouts_recovered": 1, "bytes_up": {"mask1": 1_500_000}, "bytes_down": {"mask1": 500_000},
         "seconds": {"share": 0.5, "mask1": 2.0}}))
    text = render_plain(status, 0.0)
    assert "secure" in text and "2 survivors (+1 recovered), 2 MB, 2.5s" in text
    assert "secure" not in render_plain(pb.StatusReply(state="running"), 0.0)
