"""One whole secure round in one process: the plan, every client's passes, the server's steps.

What the gRPC stages will do across machines, in the order they will do it, with the summing of
the clients' uint64 vectors left to ``sum_fn``: ``fixedpoint.wrapping_sum`` for the plain sum
mod 2^64 (tests, benchmarks of the maths), or the crypto layer's masked sum. Used by the tests
that hold the secure path to the plain methods' ``merge``, and by bench/secagg_plan.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from flora.common.lora import LoraAdapter
from flora.common.methods import AggregationMethod, RoundResult
from flora.common.secagg.contribution import client_change, client_contribution
from flora.common.privacy.private_round import Privacy
from flora.common.privacy.release import secret_generator
from flora.common.secagg.finish import Noise, Sketch, server_step
from flora.common.secagg.plan import plan_round, sketch_bases

SumFn = Callable[[list[np.ndarray]], np.ndarray]  # the clients' uint64 vectors -> their sum mod 2^64


def secure_round(
    method: AggregationMethod, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], weights: Sequence[float],
    clip_norm: float, sum_fn: SumFn, seed: int = 0, dtype: torch.dtype = torch.float32,
    privacy: Privacy | None = None, generator: torch.Generator | None = None,
) -> tuple[RoundResult, list[float]]:
    """The round's ``RoundResult`` computed from sums alone, and each client's clip factor c_k
    (what the plain ``merge`` would be given as ``clips`` for the same bound). With ``privacy``
    the clients also clip to its clip norm and the server noises the sums (from ``generator``,
    for tests; by default a secret one): the plain private release (its ``seed`` unused: Omega's
    is ``seed``)."""
    shapes = {n: (p.b.shape[0], p.a.shape[1]) for u in updates for n, p in u.pairs.items()}
    if kept is not None:
        shapes |= {n: (p.b.shape[0], p.a.shape[1]) for n, p in kept.pairs.items()}
    dp = privacy is not None
    plan = plan_round(method, kept, shapes, [u.rank for u in updates], [u.scaling for u in updates], weights,
                      clip_norm, seed, dp_clip_norm=privacy.clip_norm if dp else None,
                      dense=dp and privacy.release == "dense")
    noise = Noise(privacy.noise_multiplier, generator or secret_generator()) if dp else None
    changes = [client_change(plan, k, u) for k, u in enumerate(updates)]
    bases = sketch_bases(plan)  # every client draws the same Omega from the seed; once here
    step = server_step(plan, 1, sum_fn([np.concatenate(client_contribution(plan, 1, c, bases)) for c in changes]),
                       dtype=dtype, noise=noise)
    if isinstance(step, Sketch):
        vectors = [np.concatenate(client_contribution(plan, 2, c, step.sent)) for c in changes]
        step = server_step(plan, 2, sum_fn(vectors), step, dtype, noise)
    return step, [c.clip for c in changes]
