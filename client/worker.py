"""One training process of the daemon's worker group: ``python -m flora.client.worker FOLDER RANK``.

It reads the round's job from ``FOLDER`` (see ``flora.client.workers``), loads the base model,
data and saved weights exactly as the daemon does (on the CPU), joins the group's
``torch.distributed`` process group (gloo on CPU, NCCL on CUDA), agrees with the group on
whether to shard the model (``--shard``, ``client.sharding``) and trains its rows with
``train_round``: its whole copy moved to its device, or its shard of the model. Rank 0 prints
``progress STEP TOTAL LOSS`` lines for the daemon and writes the group's LoRA and numbers. Its
logs go to stderr, which it shares with the daemon.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
from google.protobuf import json_format

from flora.client.config import ClientSettings
from flora.client.data_parallel import GroupReplicas
from flora.client.local import load_data, load_local_model
from flora.client.round_start import train_round
from flora.client.sharding import ShardedReplicas, group_shards
from flora.client.sync import expected_shapes
from flora.client.trainer import TrainResult
from flora.client.workers import INIT, JOB, OUTCOME, PROGRESS, REMOVED, RESULT, RoundJob, RoundOutcome, read_start_adapter
from flora.common.methods import ClientStart
from flora.common.payload import PayloadMeta, read_weights, write_adapter
from flora.common.threads import set_threads
from flora.v1 import run_pb2

log = logging.getLogger("flora.client.worker")
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)


def main(argv: list[str] | None = None) -> int:
    """Train this rank's share of the round; exit 0 only when it (and, for rank 0, the result) is done."""
    folder, rank = Path((argv or sys.argv[1:])[0]), int((argv or sys.argv[1:])[1])
    progress = _progress_stream()
    _exit_with_parent()
    job = RoundJob.model_validate_json((folder / JOB).read_text())
    settings = ClientSettings.model_validate(job.settings)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s level=%(levelname)s client={settings.name} worker={rank} logger=%(name)s %(message)s")
    logging.getLogger("flora").setLevel(settings.log_level)
    set_threads(len(job.devices), settings.threads)
    backend = "nccl" if job.devices[rank].startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(job.devices[rank])  # NCCL's communicator and FSDP's mesh use the current device
    dist.init_process_group(backend, init_method=f"file://{folder / 'rendezvous'}",
                            rank=rank, world_size=len(job.devices), timeout=RENDEZVOUS_TIMEOUT)
    try:
        result = _train(folder, job, settings, rank, progress)
        if rank == 0:
            _write_result(folder, job, result)
    finally:
        dist.destroy_process_group()
    return 0


def _train(folder: Path, job: RoundJob, settings: ClientSettings, rank: int, progress: IO[str]) -> TrainResult:
    """Load what the daemon loaded, start the round as it says, train this rank's rows."""
    device = job.devices[rank]
    spec = json_format.Parse(job.spec, run_pb2.RunSpec())
    local = load_local_model(settings.model_copy(update={"device": device}), spec, load_data(settings))  # on the CPU
    shapes = expected_shapes(spec)
    if job.weights is not None:
        weights, meta = read_weights(Path(job.weights), shapes)
        if meta.version != job.version:
            raise ValueError(f"{job.weights} holds version {meta.version}, the job's is {job.version}")
        with torch.no_grad():
            for name, tensor in weights.items():
                local.model.get_submodule(name).weight.copy_(tensor)
    start = ClientStart(
        init=None if job.init is None else read_start_adapter(folder / INIT, job.init, shapes),
        removed=None if job.removed is None else read_start_adapter(folder / REMOVED, job.removed, shapes),
        train_a=job.train_a,
    )

    def report(step: int, total: int, loss: float) -> None:
        print(f"{PROGRESS} {step} {total} {loss!r}", file=progress, flush=True)

    sharded = group_shards(settings.shard, local.model, torch.device(device))
    if rank == 0:
        log.info("event=worker_group processes=%d shard=%s", len(job.devices), "full" if sharded else "none")
    replicas = (ShardedReplicas if sharded else GroupReplicas)(rank, len(job.devices))
    return train_round(
        local.model, local.train, job.config.model_copy(update={"device": device}), start,
        val_data=(local.validation or None) if rank == 0 or sharded else None,  # a sharded model evaluates together
        on_step=report if rank == 0 else None, replicas=replicas,
    )


def _write_result(folder: Path, job: RoundJob, result: TrainResult) -> None:
    """The group's LoRA as a client update payload, its numbers as JSON (rank 0 only)."""
    config = job.config
    meta = PayloadMeta("client_update", rank=config.rank, alpha=config.lora_alpha,
                       scaling_rule="rslora" if config.rslora else "standard")
    write_adapter(folder / RESULT, result.adapter, meta)
    outcome = RoundOutcome(train_loss=result.train_loss, validation_loss=result.validation_loss, steps=result.steps,
                           tokens=result.tokens, seconds=result.seconds, num_examples=result.num_examples)
    (folder / OUTCOME).write_text(outcome.model_dump_json())


def _progress_stream() -> IO[str]:
    """Progress goes to the original stdout (the daemon's pipe); everything else printed goes to stderr."""
    stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return stream


def _exit_with_parent() -> None:
    """A worker outliving its daemon (killed with SIGKILL) would train for nobody: exit with it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
