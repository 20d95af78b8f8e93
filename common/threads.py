"""How many torch threads a training process uses: the one rule every flora launcher follows.

Torch sizes its thread pool to the whole machine. Several training processes on one host (the
demo's clients, ``flora-client --nproc``'s workers) each doing so oversubscribe it: on a busy
2-core host ``flora-sim`` took 347 s with torch's default 2 threads against 77 s with one. So each
training process sets its count explicitly: the ``--threads`` the operator gave, else the cores
this process may run on divided among the training processes flora starts on the host.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota.

    A container limited with ``--cpus 2`` still sees every host core in its affinity mask; the
    quota (``cpu.max``: "<quota> <period>", or "max" when unlimited) is what it may really use.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity mask is the limit
    return max(1, cores)


def threads_per_process(processes: int, requested: int | None = None, cores: int | None = None) -> int:
    """``requested`` when given, else the usable cores shared evenly by ``processes`` (at least 1)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads: {requested} is not >= 1")
        return requested
    return max(1, (usable_cores() if cores is None else cores) // max(1, processes))


def set_threads(processes: int = 1, requested: int | None = None) -> int:
    """Size this process's torch thread pool by :func:`threads_per_process`; returns the count."""
    threads = threads_per_process(processes, requested)
    torch.set_num_threads(threads)
    log.info("event=threads torch_threads=%d training_processes=%d usable_cores=%d", threads, processes, usable_cores())
    return threads
