"""The daemon's data-parallel worker group: ``--nproc N`` training processes for one round.

The daemon keeps syncing and uploading; for each round it writes a job into the state directory
(``workers/``): ``job.json`` (the settings, the run spec, the held version, the round's
``TrainConfig``) and the round's start as safetensors (``init``, ``removed``). Nothing is
pickled: each worker (``python -m flora.client.worker``) loads the same base model, data and
saved weights the daemon loads, joins a ``torch.distributed`` group through a file in that
folder, and trains its rows of every micro-batch with the one training step in ``trainer.py``.
Rank 0 reports each step on its stdout and writes the group's one LoRA and its numbers.

The daemon supervises: the first worker to fail (an exception, a kill, an OOM) stops the others
and the round's training fails with ``WorkerFailed``, which the daemon treats as a transient
failure (back off, ask for the task again). A round closed meanwhile, or a stopping daemon,
stops the group the same way and raises ``TrainingCancelled``.
"""

from __future__ import annotations

import logging
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field

from flora.client.config import ClientSettings
from flora.client.local import ConfigError
from flora.client.trainer import TrainConfig, TrainingCancelled, TrainResult
from flora.common.devices import resolve_device
from flora.common.lora import LoraAdapter
from flora.common.methods import ClientStart
from flora.common.payload import PayloadError, PayloadMeta, read_adapter, write_adapter
from flora.v1 import run_pb2

log = logging.getLogger(__name__)

POLL_S = 0.1
PROGRESS = "progress"  # rank 0's stdout lines: "progress STEP TOTAL LOSS"
JOB, INIT, REMOVED = "job.json", "init.safetensors", "removed.safetensors"  # written by the daemon
RESULT, OUTCOME = "result.safetensors", "outcome.json"  # written by rank 0


class WorkerFailed(RuntimeError):
    """A worker of the group exited before the round's training finished."""


class StartFile(BaseModel):
    """An adapter of the round's start, handed over as ``<name>.safetensors`` beside the job."""

    model_config = ConfigDict(extra="forbid")

    scaling: float
    modules: list[str] = Field(min_length=1)


class RoundJob(BaseModel):
    """What every worker of a round reads from ``job.json`` (plain JSON, validated)."""

    model_config = ConfigDict(extra="forbid")

    settings: dict  # ClientSettings as JSON, without the enrolment token
    spec: str  # the RunSpec as protobuf JSON
    version: int = Field(ge=0)
    weights: str | None  # saved target-module weights of that version; None: the base model
    config: TrainConfig
    devices: list[str] = Field(min_length=2)
    train_a: bool
    init: StartFile | None = None
    removed: StartFile | None = None


class RoundOutcome(BaseModel):
    """Rank 0's numbers of the round, written beside the group's LoRA."""

    model_config = ConfigDict(extra="forbid")

    train_loss: float
    validation_loss: float | None
    steps: int = Field(ge=0)
    tokens: int = Field(ge=0)
    seconds: float = Field(ge=0)
    num_examples: int = Field(ge=0)


def worker_devices(settings: ClientSettings) -> list[str]:
    """The device of each training process: ``--devices`` as given, else ``--nproc`` copies of the
    CPU or ``cuda:0..N-1``; a ConfigError when this host does not have them."""
    try:
        if settings.devices:
            devices = list(settings.devices)
        elif resolve_device(settings.device).type == "cpu":
            devices = ["cpu"] * settings.nproc
        else:
            devices = [f"cuda:{i}" for i in range(settings.nproc)]
        for device in devices:
            resolve_device(device)
    except ValueError as exc:
        raise ConfigError(f"devices: {exc}") from None
    return devices


def write_start_adapter(path: Path, adapter: LoraAdapter) -> StartFile:
    """Hand an adapter of any scaling over as a payload file (alpha = scaling * rank, standard rule)."""
    meta = PayloadMeta("global_lora", rank=adapter.rank, alpha=adapter.scaling * adapter.rank, scaling_rule="standard")
    write_adapter(path, adapter, meta)
    return StartFile(scaling=adapter.scaling, modules=sorted(adapter.pairs))


def read_start_adapter(path: Path, start: StartFile, shapes: dict[str, tuple[int, int]]) -> LoraAdapter:
    """An adapter the daemon handed over, validated like any payload, at the daemon's exact scaling."""
    return read_adapter(path, {name: shapes[name] for name in start.modules}, scaling=start.scaling)[0]


class WorkerGroup:
    """Runs each round's training as ``len(devices)`` supervised worker processes."""

    def __init__(self, settings: ClientSettings, folder: Path, devices: list[str]) -> None:
        self.settings, self.folder, self.devices = settings, Path(folder), devices

    def train(
        self, spec: run_pb2.RunSpec, version: int, weights: Path | None, config: TrainConfig, start: ClientStart, *,
        on_step: Callable[[int, int, float], None] | None = None, should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Train the round on the group from the model at ``version`` (base + ``weights``)."""
        self._write_job(spec, version, weights, config, start)
        workers = [self._launch(rank) for rank in range(len(self.devices))]
        try:
            self._supervise(workers, on_step, should_stop or (lambda: False))
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()
        return self._result(spec, config)

    def _write_job(
        self, spec: run_pb2.RunSpec, version: int, weights: Path | None, config: TrainConfig, start: ClientStart
    ) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)  # also the last round's rendezvous file
        self.folder.mkdir(parents=True, mode=0o700)
        job = RoundJob(
            settings=self.settings.model_dump(mode="json", exclude={"token"}),
            spec=json_format.MessageToJson(spec), version=version, weights=None if weights is None else str(weights),
            config=config, devices=self.devices, train_a=start.train_a,
            init=None if start.init is None else write_start_adapter(self.folder / INIT, start.init),
            removed=None if start.removed is None else write_start_adapter(self.folder / REMOVED, start.removed),
        )
        (self.folder / JOB).write_text(job.model_dump_json())

    def _launch(self, rank: int) -> subprocess.Popen:
        # Same process group as the daemon (a terminal's Ctrl-C reaches every worker); a worker
        # whose daemon dies exits by itself (flora.client.worker watches its parent).
        return subprocess.Popen(
            [sys.executable, "-m", "flora.client.worker", str(self.folder), str(rank)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, text=True,
        )

    def _supervise(
        self, workers: list[subprocess.Popen], on_step: Callable[[int, int, float], None] | None, should_stop: Callable[[], bool]
    ) -> None:
        """Relay rank 0's progress until every worker exited 0; stop them all at the first failure."""
        steps: queue.Queue[tuple[int, int, float]] = queue.Queue()
        reader = threading.Thread(target=_read_progress, args=(workers[0].stdout, steps), daemon=True)
        reader.start()
        done = False
        while not done:
            try:
                step = steps.get(timeout=POLL_S)
                if on_step is not None:
                    on_step(*step)
            except queue.Empty:
                pass
            if should_stop():
                raise TrainingCancelled("training cancelled: the worker group was stopped")
            failed = [(rank, w.returncode) for rank, w in enumerate(workers) if w.poll() not in (None, 0)]
            if failed:
                rank, code = failed[0]
                raise WorkerFailed(f"training worker {rank} of {len(workers)} exited with status {code}")
            done = all(w.returncode == 0 for w in workers)
        reader.join()  # rank 0 has exited: its last lines are in the queue
        while on_step is not None and not steps.empty():
            on_step(*steps.get())

    def _result(self, spec: run_pb2.RunSpec, config: TrainConfig) -> TrainResult:
        """The group's LoRA and numbers as rank 0 wrote them, validated."""
        shapes = {m.name: (m.out_features, m.in_features) for m in spec.target_modules if m.name in config.target_modules}
        try:
            adapter, _ = read_adapter(self.folder / RESULT, shapes, rank=config.rank, scaling=config.scaling)
            outcome = RoundOutcome.model_validate_json((self.folder / OUTCOME).read_text())
        except (OSError, PayloadError, ValueError) as exc:
            raise WorkerFailed(f"the worker group's result cannot be read: {exc}") from None
        return TrainResult(adapter, outcome.train_loss, outcome.validation_loss, outcome.steps, outcome.tokens,
                           outcome.seconds, outcome.num_examples)


def _read_progress(stream: IO[str], steps: queue.Queue[tuple[int, int, float]]) -> None:
    """Rank 0's ``progress STEP TOTAL LOSS`` lines as (step, total, loss); anything else is ignored."""
    for line in stream:
        parts = line.split()
        if len(parts) == 4 and parts[0] == PROGRESS:
            try:
                steps.put((int(parts[1]), int(parts[2]), float(parts[3])))
            except ValueError:
                continue
