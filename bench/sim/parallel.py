"""``flora-sim --nproc N``: each client's round trained data-parallel over N processes (gloo, CPU).

A simulated client then trains as ``flora-client --nproc N`` does: N processes, each with its
rows of every micro-batch, one gradient all-reduce per optimiser step
(``flora.client.data_parallel.GroupReplicas``), the same ``train_round``. Its LoRA is the
single process's to round-off, so a study can check that the group changes nothing but speed.
The processes are spawned per client and round (the model, its data and the round's start
pickled to them: this process's own objects, nothing read from outside); rank 0 returns the
result, and the first process to fail fails the round with its error.
"""

from __future__ import annotations

import copy
import multiprocessing
import queue
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from flora.client.data_parallel import GroupReplicas
from flora.client.round_start import train_round
from flora.client.trainer import TrainResult
from flora.common.threads import set_threads
from flora.sim.backends import Bases, Job, full_precision_only

POLL_S = 0.1
RECEIVE_TIMEOUT_S = 600.0


class DataParallelBackend:
    """Clients one after another, each on a group of ``nproc`` spawned training processes."""

    def __init__(self, nproc: int, threads: int | None = None) -> None:
        if nproc < 2:
            raise ValueError(f"a data-parallel group needs at least 2 processes, got {nproc}")
        self.nproc, self.threads = nproc, threads

    def train(self, model: nn.Module, jobs: Sequence[Job], bases: Bases | None = None) -> list[TrainResult]:
        full_precision_only(jobs, f"--nproc {self.nproc}")
        for job in jobs:
            if job.config.device != "cpu":
                raise ValueError(f"--nproc runs its group on the CPU (gloo); --device is {job.config.device!r}")
        return [self._group(model, job) for job in jobs]

    def _group(self, model: nn.Module, job: Job) -> TrainResult:
        ctx = multiprocessing.get_context("spawn")
        results, received = ctx.Queue(), ctx.Event()
        with tempfile.TemporaryDirectory(prefix="flora-sim-group-") as tmp:
            init = f"file://{Path(tmp) / 'rendezvous'}"
            workers = [ctx.Process(target=_member, args=(rank, self.nproc, init, model, job, self.threads, results, received))
                       for rank in range(self.nproc)]
            for worker in workers:
                worker.start()
            try:
                return _collect(workers, results)
            finally:
                received.set()
                for worker in workers:
                    worker.kill()
                    worker.join()


def _collect(workers: list[Any], results: Any) -> TrainResult:
    """Rank 0's result, or the first failure (a reported error, or a process that died without one)."""
    while True:
        try:
            status, value = results.get(timeout=POLL_S)
        except queue.Empty:
            dead = [(rank, w.exitcode) for rank, w in enumerate(workers) if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"training process {dead[0][0]} of {len(workers)} exited with status {dead[0][1]}")
            continue
        if status != "ok":
            raise RuntimeError(value)
        return value


def _member(rank: int, world: int, init: str, model: nn.Module, job: Job, threads: int | None, results: Any,
            received: Any) -> None:
    """One process of the group: its rows of the round; rank 0 sends the group's result (and stays
    until it is received: its tensors travel through shared memory this process owns)."""
    try:
        # The model arrives in shared memory, the parent's and every rank's at once; a round that
        # removes its start from the weights for the block (flora-warm, fedit) must do so on its own copy.
        model = copy.deepcopy(model)
        set_threads(world, threads)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        try:
            result = train_round(model, job.data, job.config, job.start, replicas=GroupReplicas(rank, world))
        finally:
            dist.destroy_process_group()
        if rank == 0:
            results.put(("ok", result))
            received.wait(RECEIVE_TIMEOUT_S)
    except BaseException as error:  # the parent reports it and stops the group
        results.put(("error", f"training process {rank} of {world}: {type(error).__name__}: {error}"))
        raise
