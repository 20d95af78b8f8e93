"""Real ``flora-client`` processes for integration tests: data files, start, kill, inspect.

Each client runs as its own Python process (``python -m flora.client.cli``) with a state
directory and a log file under the test's tmp_path, exactly as an operator would run it; tests
read its log and its state directory, and talk to the server only through flora.v1 calls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from torch import Tensor

from flora.client.state import Identity
from flora.common.chunks import ChunkError
from flora.common.payload import read_weights
from flora.common.wire import ArtifactReceiver
from flora.v1 import coordinator_pb2, coordinator_pb2_grpc, transfer_pb2

# Short everything: loopback calls are fast, and a restarted server must be noticed quickly. One torch
# thread per client: the default (usable cores / training processes) gives each of a test's clients
# every core, and several clients training at once on a 2-core CI machine oversubscribe it.
FAST_FLAGS = (
    "--progress", "off", "--long-poll", "1", "--rpc-timeout", "10", "--heartbeat-interval", "0.5",
    "--backoff-initial", "0.1", "--backoff-max", "1", "--batch-size", "4", "--cutoff", "48", "--threads", "1",
)


def write_data(path: Path, form: str, count: int, offset: int = 0) -> Path:
    """A small instruction data file in Dolly (JSON array) or Alpaca (JSONL) form."""
    if form == "dolly":
        records = [{"instruction": f"Add {i} and {offset}", "context": "", "response": str(i + offset), "category": "math"}
                   for i in range(count)]
        path.write_text(json.dumps(records))
    else:
        records = [{"instruction": f"Double {i + offset}", "input": "", "output": str(2 * (i + offset))} for i in range(count)]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class ClientProcess:
    """One running (or finished) flora-client process and its files."""

    name: str
    state_dir: Path
    log_path: Path
    args: list[str]
    process: subprocess.Popen = field(repr=False)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; returns its status (the log is in the failure message)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"client {self.name} did not finish in {timeout}s; its log:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float) -> None:
        """Block until ``text`` appears in the log (or fail with the log)."""
        wait_until(lambda: text in self.log(), timeout, f"{text!r} in the log of {self.name}:\n{self.log()}")

    def identity(self) -> Identity:
        """The identity the client saved in its state directory."""
        return Identity.model_validate_json((self.state_dir / "identity.json").read_text())

    def held_version(self) -> int:
        """The version the client's saved state points at."""
        return json.loads((self.state_dir / "state.json").read_text())["version"]

    def weights(self, shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
        """The target modules' weights the client saved at its held version."""
        path = self.state_dir / "model" / f"weights-v{self.held_version()}.safetensors"
        return read_weights(path, shapes)[0]


def start_client(
    address: str, name: str, data: Path, state_dir: Path, rank: int, *extra: str, log_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> ClientProcess:
    """Start ``flora-client`` as its own process (``env`` over the inherited environment); appends
    to its log across restarts."""
    log_path = (log_dir or state_dir.parent) / f"{name}.log"
    args = [sys.executable, "-m", "flora.client.cli", "--server", address, "--name", name, "--data", str(data),
            "--state-dir", str(state_dir), "--rank", str(rank), *FAST_FLAGS, *extra]
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=environ)
    return ClientProcess(name, state_dir, log_path, args, process)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds (no timing assertion: only a generous upper bound)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


class ServerView:
    """The server as a client sees it, through flora.v1 calls made with a client's token."""

    def __init__(self, address: str, token: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)

    def close(self) -> None:
        self._channel.close()

    def status(self) -> coordinator_pb2.StatusReply:
        return self._stub.Status(coordinator_pb2.StatusRequest(), metadata=self._metadata, timeout=10)

    def merged_weights(self, folder: Path, version: int, shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
        """The server's merged target-module weights at ``version`` (MERGED_MODULES), verified."""
        request = coordinator_pb2.FetchGlobalRequest(
            kind=transfer_pb2.ARTIFACT_KIND_MERGED_MODULES, from_version=version, to_version=version
        )
        with ArtifactReceiver(lambda kind, v: folder / f"merged-v{v}.safetensors", 1 << 30) as receiver:
            for chunk in self._stub.FetchGlobal(request, metadata=self._metadata, timeout=60):
                receiver.feed(chunk)
            (artifact,) = receiver.finish()
        if artifact.version != version:
            raise ChunkError(f"asked for merged weights v{version}, got v{artifact.version}")
        return read_weights(artifact.path, shapes)[0]

