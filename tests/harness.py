"""The real ``flora-server`` as a subprocess, and a scripted flora.v1 client to drive it.

``start_server`` runs ``python -m flora.server.cli`` on port 0, waits for its
``listening on HOST:PORT`` line and returns a handle; the ``server_factory`` fixture makes sure
every process it started is gone after the test. ``ScriptedClient`` speaks the protocol call by
call (it is not the client daemon), and ``make_update`` builds valid or deliberately broken
update payloads for the run's target modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from flora.common.lora import LoraAdapter, LoraPair
from flora.common.payload import PayloadMeta, encode_adapter
from flora.common.wire import update_messages
from flora.demo.processes import LISTENING
from flora.v1 import coordinator_pb2 as pb
from flora.v1 import coordinator_pb2_grpc, run_pb2, transfer_pb2

START_TIMEOUT_S = 120.0
OPERATOR_TOKEN = "operator-token-0123456789"


@dataclass
class ServerProcess:
    """One server process started by ``start_server``."""

    process: subprocess.Popen
    port: int
    state_dir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        return "".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the crash every durable write must survive."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def start_server(state_dir: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start a server on a free port and wait until it listens (its output is kept)."""
    # flora unless the test names a method: these tests pin stacking's own behaviour (round ranks, no GLOBAL_LORA).
    command = [sys.executable, "-m", "flora.server.cli", "--port", "0", "--state-dir", str(state_dir), "--method", "flora", *flags]
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ)
    lines: list[str] = []
    ports: queue.Queue[int | None] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if match := LISTENING.search(line):
                ports.put(int(match["port"]))
        ports.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        port = ports.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        port = None
    if port is None:
        process.kill()
        process.wait(30)
        raise RuntimeError(f"flora-server did not start; its output:\n{''.join(lines)}")
    return ServerProcess(process, port, state_dir, lines)


@contextlib.contextmanager
def running_server(state_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A started server that is killed when the block ends, however it ends."""
    server = start_server(state_dir, *flags, env=env)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture()
def server_factory(tmp_path: Path) -> Iterator:
    """``server_factory(*flags, state_dir=...)`` starts servers that are killed after the test."""
    started: list[ServerProcess] = []

    def factory(*flags: str, state_dir: Path | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        server = start_server(state_dir or tmp_path / "state", *flags, env=env)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.kill()


# --- payloads -------------------------------------------------------------------------------


def target_shapes(spec: run_pb2.RunSpec) -> dict[str, tuple[int, int]]:
    """The run's target modules as {name: (out_features, in_features)}."""
    return {m.name: (m.out_features, m.in_features) for m in spec.target_modules}


def random_adapter(shapes: dict[str, tuple[int, int]], rank: int, scaling: float, seed: int) -> LoraAdapter:
    """Seeded LoRA factors (both factors non-zero, so the update is non-trivial)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {
        name: LoraPair(torch.randn(rank, d_in, generator=generator) * 0.1, torch.randn(d_out, rank, generator=generator) * 0.1)
        for name, (d_out, d_in) in sorted(shapes.items())
    }
    return LoraAdapter(pairs, scaling)


def make_update(adapter: LoraAdapter, alpha: float, round_number: int, rule: str = "standard") -> bytes:
    """A client_update payload for ``adapter``."""
    meta = PayloadMeta("client_update", rank=adapter.rank, alpha=alpha, scaling_rule=rule, round=round_number)
    return encode_adapter(adapter, meta)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the scripted client --------------------------------------------------------------------


@dataclass
class ScriptedClient:
    """One protocol participant with its own channel and token."""

    address: str
    name: str
    rank: int = 4
    alpha: float = 8.0
    num_examples: int = 10
    token: str | None = None
    client_id: str = ""
    spec: run_pb2.RunSpec | None = None
    rule: int = run_pb2.SCALING_RULE_STANDARD
    credentials: grpc.ChannelCredentials | None = None  # TLS; plaintext when None

    def __post_init__(self) -> None:
        if self.credentials is None:
            self.channel = grpc.insecure_channel(self.address)
        else:
            self.channel = grpc.secure_channel(self.address, self.credentials)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def metadata(self, token: str | None = None) -> list[tuple[str, str]]:
        token = token or self.token
        return [("authorization", f"Bearer {token}")] if token else []

    def join(self, base_hash: str, token: str | None = None) -> pb.JoinReply:
        """Join (with ``token``: the enrolment token, or this client's own to rejoin)."""
        caps = pb.Capabilities(rank=self.rank, alpha=self.alpha, scaling_rule=self.rule, device="cpu",
                               num_examples=self.num_examples, software_version="test")
        reply = self.stub.Join(pb.JoinRequest(client_name=self.name, capabilities=caps, base_model_hash=base_hash),
                               metadata=self.metadata(token), timeout=30)
        self.token, self.client_id, self.spec = reply.client_token, reply.client_id, reply.run
        return reply

    def next_task(self, max_wait_ms: int = 0) -> pb.Task:
        return self.stub.NextTask(pb.NextTaskRequest(max_wait_ms=max_wait_ms), metadata=self.metadata(), timeout=60)

    def wait_for_train(self, attempts: int = 60) -> pb.TrainTask:
        """Poll until a TRAIN task arrives."""
        for _ in range(attempts):
            task = self.next_task(max_wait_ms=1000)
            if task.WhichOneof("kind") == "train":
                return task.train
        raise AssertionError(f"{self.name}: no TRAIN task; last answer {task}")

    def wait_for_version(self, version: int, attempts: int = 300) -> pb.StatusReply:
        """Poll Status until the run reaches ``version``."""
        for _ in range(attempts):
            status = self.status()
            if status.global_version >= version:
                return status
            time.sleep(0.2)
        raise AssertionError(f"the run did not reach version {version}: {status}")

    def status(self) -> pb.StatusReply:
        return self.stub.Status(pb.StatusRequest(), metadata=self.metadata(), timeout=30)

    def adapter(self, seed: int) -> LoraAdapter:
        rslora = self.rule == run_pb2.SCALING_RULE_RSLORA
        scaling = self.alpha / (self.rank ** 0.5 if rslora else self.rank)
        return random_adapter(target_shapes(self.spec), self.rank, scaling, seed)

    def header(self, payload: bytes, round_number: int, **overrides) -> transfer_pb2.UpdateHeader:
        fields = {"round": round_number, "rank": self.rank, "alpha": self.alpha, "scaling_rule": self.rule,
                  "num_examples": self.num_examples, "total_bytes": len(payload), "sha256": sha256(payload),
                  "base_version": round_number - 1, "train_loss": 1.5, "steps": 3, "train_seconds": 0.5}
        fields.update(overrides)
        return transfer_pb2.UpdateHeader(**fields)

    def submit(self, payload: bytes, round_number: int, chunk_size: int = 4096, **overrides) -> pb.SubmitReply:
        """Upload ``payload`` for a round (header fields may be overridden to break it)."""
        header = self.header(payload, round_number, **overrides)
        return self.submit_messages(update_messages(header, payload, chunk_size) if header.total_bytes == len(payload)
                                    else raw_messages(header, payload, chunk_size))

    def submit_messages(self, messages) -> pb.SubmitReply:
        return self.stub.SubmitUpdate(messages, metadata=self.metadata(), timeout=60)

    def fetch(
        self, kind: int, from_version: int, to_version: int, offset: int = 0, allow_merged: bool = False
    ) -> list[transfer_pb2.Chunk]:
        request = pb.FetchGlobalRequest(kind=kind, from_version=from_version, to_version=to_version, offset=offset,
                                        allow_merged=allow_merged)
        return list(self.stub.FetchGlobal(request, metadata=self.metadata(), timeout=60))

    def close(self) -> None:
        self.channel.close()


def raw_messages(header: transfer_pb2.UpdateHeader, payload: bytes, chunk_size: int) -> Iterator[transfer_pb2.UpdateChunk]:
    """Header then pieces, with no consistency check (for deliberately inconsistent uploads)."""
    yield transfer_pb2.UpdateChunk(header=header)
    for start in range(0, len(payload), chunk_size):
        yield transfer_pb2.UpdateChunk(piece=transfer_pb2.UpdatePiece(offset=start, data=payload[start:start + chunk_size]))


def artifacts(chunks: list[transfer_pb2.Chunk]) -> dict[int, bytes]:
    """Reassemble a FetchGlobal stream by version (checking each artifact's sha256)."""
    out: dict[int, bytearray] = {}
    digests: dict[int, str] = {}
    for chunk in chunks:
        data = out.setdefault(chunk.version, bytearray())
        assert chunk.offset == len(data), f"version {chunk.version}: chunk at {chunk.offset}, expected {len(data)}"
        data.extend(chunk.data)
        digests[chunk.version] = chunk.sha256
    for version, data in out.items():
        assert sha256(bytes(data)) == digests[version], f"version {version}: sha256 mismatch"
    return {v: bytes(d) for v, d in out.items()}
