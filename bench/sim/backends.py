"""Where a simulated round's clients train: in turn in this process, or as Ray tasks.

A backend takes the global model and one ``Job`` per client and returns their ``TrainResult``s
in order. Both run the very same ``train_round``, so a study moved to a Ray cluster (``--backend
ray --ray-address ...``) follows the code path measured here. Ray is an optional extra
(``pip install 'flora-fl[ray]'``); nothing imports it until a Ray backend is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from flora.client.local_weights import LocalWeights
from flora.client.round_start import train_round
from flora.client.trainer import TrainConfig, TrainResult
from flora.common.data import TokenizedExample
from flora.common.methods import ClientStart
from flora.common.threads import set_threads
from flora.sim.bases import FULL

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """One client's local training in a round."""

    data: Sequence[TokenizedExample]
    config: TrainConfig
    start: ClientStart
    base: str = FULL  # the client's base: full precision (the global model), or a quantization (flora.sim.bases)


Bases = Mapping[str, LocalWeights]  # the quantized clients' models, by quantization


class Backend(Protocol):
    def train(self, model: nn.Module, jobs: Sequence[Job], bases: Bases | None = None) -> list[TrainResult]:
        """Run every job on (a copy of) ``model``, or of its quantized base in ``bases``; all left unchanged."""


def full_precision_only(jobs: Sequence[Job], backend: str) -> None:
    """Refuse quantized clients on a backend that ships the model to other processes."""
    if any(job.base != FULL for job in jobs):
        raise ValueError(f"--quantize works with --backend local and --nproc 1, not {backend}")


class LocalBackend:
    """Clients one after another on the caller's model (deterministic on CPU)."""

    def train(self, model: nn.Module, jobs: Sequence[Job], bases: Bases | None = None) -> list[TrainResult]:
        return [train_round(model if job.base == FULL else (bases or {})[job.base], job.data, job.config, job.start)
                for job in jobs]


def _train_job(model: nn.Module, job: Job, threads: int) -> TrainResult:
    set_threads(requested=threads)
    return train_round(model, job.data, job.config, job.start)


class RayBackend:
    """Each client of a round as one Ray task on its own copy of the global model.

    ``address`` None starts (or joins) a local Ray; otherwise it names a cluster
    ("ray://head:10001" or "auto"). The model goes into the object store once per round.
    """

    def __init__(self, address: str | None = None, threads: int = 1) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError("--backend ray needs Ray: pip install 'flora-fl[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self._threads = threads
        self._task = ray.remote(num_cpus=threads)(_train_job)  # Ray places tasks by the cores they use

    def train(self, model: nn.Module, jobs: Sequence[Job], bases: Bases | None = None) -> list[TrainResult]:
        full_precision_only(jobs, "--backend ray")
        shared = self._ray.put(model)
        return self._ray.get([self._task.remote(shared, job, self._threads) for job in jobs])


def make_backend(name: str, address: str | None = None, threads: int | None = None, nproc: int = 1) -> Backend:
    """The backend called ``name`` (one of BACKENDS); ``threads`` per Ray task (default 1); with
    ``nproc`` > 1 each client's round data-parallel over that many processes (local only)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if nproc > 1 and name != "local":
        raise ValueError(f"--nproc {nproc} works with --backend local, not {name}")
    if name == "local":
        if address is not None:
            raise ValueError("--ray-address applies to --backend ray")
        if nproc > 1:
            from flora.sim.parallel import DataParallelBackend

            return DataParallelBackend(nproc, threads)
        return LocalBackend()
    if name == "ray":
        return RayBackend(address, threads or 1)
    raise ValueError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
