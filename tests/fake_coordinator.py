"""A scripted, in-process Coordinator for the client's unit tests.

It speaks flora.v1 over a real loopback gRPC server (synchronous, port 0) but decides nothing:
tasks come from a script, artifacts from a dict, and faults (an aborted call, a stream cut after
some bytes, a refused upload) are injected per call. Every request is recorded so that tests
can check exactly what the client sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch

from flora.common.basemodel import BUILTIN_MODEL, DEFAULT_TARGET_MODULES, fingerprint, load_model, target_module_shapes
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.downlink import plan_downlink
from flora.common.payload import PayloadMeta, encode_update, encode_weights
from flora.common.wire import UpdateReceiver, artifact_chunks
from flora.v1 import coordinator_pb2, coordinator_pb2_grpc, run_pb2, transfer_pb2

TOKEN = "client-token-1"
CHUNK = 4096


def tiny_spec(method: int = run_pb2.AGGREGATION_METHOD_FLORA, rounds: int = 2, **extra: object) -> run_pb2.RunSpec:
    """The RunSpec a server of the built-in tiny model would send."""
    model = load_model(BUILTIN_MODEL)
    shapes = target_module_shapes(model, DEFAULT_TARGET_MODULES)
    return run_pb2.RunSpec(
        run_id="run-1", base_model=BUILTIN_MODEL, base_model_hash=fingerprint(model, shapes),
        target_modules=[run_pb2.TargetModule(name=n, out_features=o, in_features=i) for n, (o, i) in shapes.items()],
        method=method, rounds=rounds, max_update_bytes=64 << 20, chunk_size=CHUNK, **extra,
    )


def random_adapter(spec: run_pb2.RunSpec, rank: int, scaling: float, seed: int) -> LoraAdapter:
    """Random factors of ``rank`` for every target module of ``spec``."""
    gen = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {m.name: LoraPair(torch.randn(rank, m.in_features, generator=gen) * 0.01,
                          torch.randn(m.out_features, rank, generator=gen) * 0.01) for m in spec.target_modules},
        scaling,
    )


def global_update_payload(adapter: LoraAdapter, version: int) -> bytes:
    """The downlink of ``version`` as the server would serve it, for an aggregate equal to ``adapter``."""
    stack = {name: LoraPair(pair.a * adapter.scaling, pair.b) for name, pair in adapter.pairs.items()}
    return encode_update(plan_downlink(stack).update, PayloadMeta("global_update", round=version, version=version))


def merged_payload(weights: dict[str, torch.Tensor], version: int) -> bytes:
    """The server's merged modules of ``version``."""
    return encode_weights(weights, PayloadMeta("merged_modules", version=version))


@dataclass
class Fault:
    """Abort the next matching call with ``code``; for FetchGlobal, after ``after_bytes`` bytes."""

    code: grpc.StatusCode
    after_bytes: int = 0
    details: str = ""  # the message (default: "injected <CODE>")


@dataclass
class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Answers from a script; records everything."""

    spec: run_pb2.RunSpec
    tasks: list[coordinator_pb2.Task] = field(default_factory=list)
    artifacts: dict[tuple[int, int], bytes] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=lambda: defaultdict(list))
    round_closed: bool = False
    tamper: bool = False  # flip one byte of every artifact streamed (after hashing it)
    hold_s: float = 0.0  # how long NextTask holds each call before answering (a long-poll)
    merged_instead: bool = False  # answer an allow_merged update request with the merged modules
    requests: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    metadata: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    uploads: list[tuple[transfer_pb2.UpdateHeader, bytes]] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)  # held calls the client gave up on
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, method: str, request: object, context: grpc.ServicerContext) -> Fault | None:
        with self.lock:
            self.requests[method].append(request)
            self.metadata[method].append(dict(context.invocation_metadata()).get("authorization"))
            fault = self.faults[method].pop(0) if self.faults[method] else None
        if fault is not None and not (method == "FetchGlobal" and fault.after_bytes):
            context.abort(fault.code, fault.details or f"injected {fault.code.name}")
        return fault

    def _latest(self) -> int:
        return max((v for (_, v) in self.artifacts), default=0)

    def GetRun(self, request, context):
        self._enter("GetRun", request, context)
        return coordinator_pb2.GetRunReply(run=self.spec, global_version=self._latest())

    def Join(self, request, context):
        self._enter("Join", request, context)
        return coordinator_pb2.JoinReply(client_id="c1", client_token=TOKEN, run=self.spec, global_version=self._latest())

    def NextTask(self, request, context):
        self._enter("NextTask", request, context)
        until = time.monotonic() + self.hold_s
        while time.monotonic() < until:
            if not context.is_active():  # the client cancelled (or its deadline passed)
                self.abandoned.append("NextTask")
                return coordinator_pb2.Task()
            time.sleep(0.05)
        with self.lock:
            if self.tasks:
                return self.tasks.pop(0)
        latest = max((v for (k, v) in self.artifacts if k == transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE), default=0)
        return coordinator_pb2.Task(finished=coordinator_pb2.FinishedTask(final_version=latest))

    def FetchGlobal(self, request, context):
        fault = self._enter("FetchGlobal", request, context)
        kind = request.kind
        if kind == transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE:
            versions = range(request.from_version + 1, request.to_version + 1)
        else:
            versions = [request.to_version]
        merged = (transfer_pb2.ARTIFACT_KIND_MERGED_MODULES, request.to_version)
        if kind == transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE and request.allow_merged and self.merged_instead and merged in self.artifacts:
            kind, versions = merged[0], [merged[1]]
        sent, offset = 0, request.offset
        for version in versions:
            payload = self.artifacts[(kind, version)]
            digest = hashlib.sha256(payload).hexdigest()
            for chunk in artifact_chunks(kind, version, payload, digest, CHUNK, offset):
                if fault is not None and sent >= fault.after_bytes:
                    context.abort(fault.code, "injected cut")
                sent += len(chunk.data)
                if self.tamper and chunk.data:
                    chunk.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
                yield chunk
            offset = 0

    def SubmitUpdate(self, request_iterator, context):
        self._enter("SubmitUpdate", None, context)
        sink = io.BytesIO()
        receiver = UpdateReceiver(sink, 1 << 30)
        for message in request_iterator:
            receiver.feed(message)
        header = receiver.finish()
        with self.lock:
            self.uploads.append((header, sink.getvalue()))
        return coordinator_pb2.SubmitReply(accepted=True, round=header.round, message="accepted")

    def Heartbeat(self, request, context):
        self._enter("Heartbeat", request, context)
        return coordinator_pb2.HeartbeatReply(open_round=request.round, round_closed=self.round_closed)

    def Leave(self, request, context):
        self._enter("Leave", request, context)
        return coordinator_pb2.LeaveReply()


@contextlib.contextmanager
def serving(fake: FakeCoordinator) -> Iterator[str]:
    """Serve ``fake`` on a free loopback port; yields "127.0.0.1:PORT"."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=0)
