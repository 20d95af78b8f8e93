"""Protocol-level flora.v1 clients for bench.load: many per process, no training, real calls.

Each ``LoadClient`` makes the calls the ``flora-client`` daemon makes, in the same order and with
the same deadlines (client/daemon.py, client/heartbeat.py): GetRun, Join, then NextTask long-polls;
on TRAIN it downloads the global adapters it lacks (FetchGlobal, verified by sha256 into no file),
"trains" for a fixed time while sending Heartbeats, and uploads a valid rank-r update built with
the project's payload helpers (SubmitUpdate); until FINISHED. One worker process runs a few
hundred of them on one asyncio loop (``run_worker``) and returns every call's latency and status.

Every loop is bounded by the worker's deadline, every call by its own deadline; addresses are the
loopback server's only.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import resource
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import torch

from flora.common.chunks import ChunkReceiver
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.payload import PayloadMeta, encode_adapter
from flora.common.wire import update_messages
from flora.v1 import coordinator_pb2 as pb
from flora.v1 import coordinator_pb2_grpc, run_pb2, transfer_pb2

RPC_TIMEOUT_S = 30.0  # the client's default rpc_timeout
TRANSFER_TIMEOUT_S = 600.0  # the client's default transfer_timeout
CALLS = ("Join", "NextTask", "FetchGlobal", "SubmitUpdate", "Heartbeat")


@dataclass(frozen=True)
class Plan:
    """What every client of a worker does: the same for all, so that runs compare."""

    address: str
    rank: int
    long_poll_s: float
    train_s: float
    heartbeat_s: float
    round_deadline_s: float
    deadline: float  # time.time() after which every client stops where it is


@dataclass
class Tally:
    """What a worker measured: latencies per call, status codes per call, TRAIN delivery delays."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    codes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    delivery: list[float] = field(default_factory=list)  # round opened -> this client got TRAIN
    finished: int = 0

    def as_dict(self) -> dict:
        return {"latencies": dict(self.latencies), "codes": {k: dict(v) for k, v in self.codes.items()},
                "delivery": self.delivery, "finished": self.finished}


class Payloads:
    """A valid update per round and client (same rank, same shapes): the server refuses a second
    client's copy of an accepted payload, so each client's bytes differ (a seed of its own)."""

    def __init__(self, spec: run_pb2.RunSpec, rank: int) -> None:
        self._shapes = {m.name: (m.out_features, m.in_features) for m in spec.target_modules}
        self._rank = rank

    def for_round(self, number: int, client: str) -> bytes:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{client}:{number}".encode()))
        pairs = {n: LoraPair(torch.rand(self._rank, d_in, generator=gen) - 0.5, torch.zeros(d_out, self._rank))
                 for n, (d_out, d_in) in sorted(self._shapes.items())}
        meta = PayloadMeta("client_update", rank=self._rank, alpha=float(self._rank), scaling_rule="standard",
                           round=number)
        return encode_adapter(LoraAdapter(pairs, 1.0), meta)


class LoadClient:
    """One simulated data holder on its own channel (its own TCP connection, as a real one)."""

    def __init__(self, name: str, plan: Plan, tally: Tally, payloads: Payloads, spec: run_pb2.RunSpec) -> None:
        self.name, self.plan, self.tally, self.payloads, self.spec = name, plan, tally, payloads, spec
        limit = 2 * spec.chunk_size + (1 << 20)
        self.channel = grpc.aio.insecure_channel(plan.address, options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.use_local_subchannel_pool", 1),  # a TCP connection of its own, not one shared by the process
        ])
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.token = ""
        self.version = 0

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    async def _call(self, name: str, make):
        """Time one call and count its status; RpcError is counted and re-raised."""
        start = time.perf_counter()
        try:
            result = await make()
        except grpc.aio.AioRpcError as err:
            self.tally.codes[name][err.code().name] += 1
            raise
        self.tally.latencies[name].append(time.perf_counter() - start)
        self.tally.codes[name]["OK"] += 1
        return result

    async def run(self) -> None:
        """Join, then rounds until FINISHED or the deadline; errors end this client (they are counted)."""
        try:
            caps = pb.Capabilities(rank=self.plan.rank, alpha=float(self.plan.rank), device="cpu", num_examples=10,
                                   scaling_rule=run_pb2.SCALING_RULE_STANDARD, software_version="bench-load")
            request = pb.JoinRequest(client_name=self.name, capabilities=caps, base_model_hash=self.spec.base_model_hash)
            reply = await self._call("Join", lambda: self.stub.Join(request, timeout=RPC_TIMEOUT_S))
            self.token = reply.client_token
            while time.time() < self.plan.deadline:
                task = await self._next_task()
                kind = task.WhichOneof("kind")
                if kind == "finished":
                    self.tally.finished += 1
                    return
                if kind == "train":
                    await self._round(task.train)
        except grpc.aio.AioRpcError:
            return
        finally:
            await self.channel.close()

    async def _next_task(self) -> pb.Task:
        request = pb.NextTaskRequest(local_version=self.version, max_wait_ms=int(self.plan.long_poll_s * 1000))
        task = await self._call("NextTask", lambda: self.stub.NextTask(
            request, metadata=self._metadata(), timeout=self.plan.long_poll_s + RPC_TIMEOUT_S))
        if task.WhichOneof("kind") == "train":
            opened = task.train.deadline_unix_ms / 1000 - self.plan.round_deadline_s
            self.tally.delivery.append(time.time() - opened)
        return task

    async def _round(self, train: pb.TrainTask) -> None:
        if train.required_version > self.version:
            await self._call("FetchGlobal", lambda: self._fetch(train.required_version))
            self.version = train.required_version
        beats = asyncio.create_task(self._heartbeats(train.round))
        try:
            await asyncio.sleep(self.plan.train_s)
        finally:
            beats.cancel()
        data = self.payloads.for_round(train.round, self.name)
        header = transfer_pb2.UpdateHeader(
            round=train.round, rank=self.plan.rank, alpha=float(self.plan.rank), scaling_rule=run_pb2.SCALING_RULE_STANDARD,
            num_examples=10, total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), base_version=train.required_version,
            train_loss=1.0, steps=1, train_seconds=self.plan.train_s)
        await self._call("SubmitUpdate", lambda: self.stub.SubmitUpdate(
            update_messages(header, data, self.spec.chunk_size), metadata=self._metadata(), timeout=TRANSFER_TIMEOUT_S))

    async def _fetch(self, to_version: int) -> None:
        """Every global adapter from our version to ``to_version``, each verified by its sha256."""
        request = pb.FetchGlobalRequest(kind=transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE, from_version=self.version,
                                        to_version=to_version)
        receiver: tuple[int, ChunkReceiver] | None = None
        async for chunk in self.stub.FetchGlobal(request, metadata=self._metadata(), timeout=TRANSFER_TIMEOUT_S):
            if receiver is None or receiver[0] != chunk.version:
                if receiver is not None:
                    receiver[1].finish()
                receiver = (chunk.version, ChunkReceiver(io.BytesIO(), chunk.total_bytes, chunk.sha256, 1 << 40))
            receiver[1].add(chunk.offset, chunk.data)
        if receiver is not None:
            receiver[1].finish()

    async def _heartbeats(self, number: int) -> None:
        """As client/heartbeat.py: one beat every interval with a deadline of twice the interval."""
        request = pb.HeartbeatRequest(activity=pb.CLIENT_ACTIVITY_TRAINING, round=number, progress=0.5)
        while time.time() < self.plan.deadline:
            await asyncio.sleep(self.plan.heartbeat_s)
            try:
                await self._call("Heartbeat", lambda: self.stub.Heartbeat(
                    request, metadata=self._metadata(), timeout=min(RPC_TIMEOUT_S, 2 * self.plan.heartbeat_s)))
            except grpc.aio.AioRpcError:
                continue  # counted; the real heartbeat thread also carries on


async def _run_clients(plan: Plan, names: list[str], stagger_s: float) -> Tally:
    tally = Tally()
    async with grpc.aio.insecure_channel(plan.address) as channel:
        spec = (await coordinator_pb2_grpc.CoordinatorStub(channel).GetRun(pb.GetRunRequest(), timeout=RPC_TIMEOUT_S)).run
    payloads = Payloads(spec, plan.rank)
    clients = [LoadClient(name, plan, tally, payloads, spec) for name in names]
    tasks = []
    for client in clients:
        tasks.append(asyncio.create_task(client.run()))
        await asyncio.sleep(stagger_s)  # clients arrive over a few seconds, not in one instant
    remaining = max(1.0, plan.deadline - time.time() + RPC_TIMEOUT_S)
    done, pending = await asyncio.wait(tasks, timeout=remaining)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return tally


def run_worker(plan: Plan, names: list[str], stagger_s: float) -> dict:
    """Process entry point: run ``names`` as clients until they finish or the plan's deadline."""
    torch.set_num_threads(1)
    tally = asyncio.run(_run_clients(plan, names, stagger_s)).as_dict()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {**tally, "cpu_s": usage.ru_utime + usage.ru_stime}
