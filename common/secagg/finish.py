"""The server's side of a secure round: from unmasked sums to the method's ``RoundResult``.

After pass 1 of a sketched round the server holds Y = sum_k D_k Omega per module (and the dense
modules' sums), orthonormalizes Y to Q and broadcasts Q rounded to float32 (Q'); after pass 2 it
holds P = sum_k D_k^T Q', and the round's change is Delta = Q (Q'^T Q)^-1 P^T
= sum_k p_k c_k (s_k B_k A_k - init_k) exactly (to float64 round-off: the sum's range lies in
Q's span, so Q'^T D = (Q'^T Q) Q^T D; ``flora.common.sketch.assemble``).
What the method keeps for the next round is then computed from Delta and the public starts alone
(never from a client's factors): with S = sum_k p_k init_k (each init_k is the method's start
for client k's announced rank, which every participant can compute),

- flora:      delta = Delta,              kept = none;
- flora-warm: delta = Delta,              kept = canonical(S + Delta), cut to the largest rank;
- flexlora:   kept' = canonical(S + Delta), delta = kept' - kept;
- ffa:        with T = sum_k p_k c_k pad(B_k - B_start,k) (one pass), kept' = (A, sum_k p_k
  pad(B_start,k) + T) and delta = s T A: A is frozen and public.

Under differential privacy the method's own ``released`` (the plain private round's last step)
turns the noisy change into the result instead: the same maths for these methods, and by
construction the plain private round's result for any method that has a private release.

These equal the plain methods' ``merge`` with the same clip factors: S + Delta is the average of
the clients' clipped products that ``clipped_stack`` forms, and T is ffa's weighted B change.

Under differential privacy (``Noise``) the server adds Gaussian noise to each pass's unmasked
sum before anything reads it (``released_sum``): Y and the dense blocks in pass 1, P in pass 2,
T for ffa. With the clients' DP clip (``flora.common.secagg.contribution``) and the same noise,
the result is the plain private release's (``flora.common.privacy.private_round``): the same
Omega, module layout and noise order, and the sums equal to fixed-point round-off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flora.common.lora import LoraAdapter, LoraPair, pad_pair
from flora.common.methods import RoundResult
from flora.common.methods.base import canonical_adapter, difference, plus_starts
from flora.common.privacy.release import noise_std, noised
from flora.common.secagg.fixedpoint import check_sum, decode
from flora.common.secagg.plan import FACTORS, RoundPlan, rank_bound, split
from flora.common.omega import sketch_basis
from flora.common.sketch import assemble, broadcast_basis, range_basis


@dataclass(frozen=True)
class Sketch:
    """What pass 1 of a sketched round leaves: Q per sketched module (d_out x m, float64; the
    participants receive it rounded to float32, ``sent``) and the dense modules' finished sums
    (held by the server)."""

    q: dict[str, Tensor]
    dense: dict[str, Tensor]

    @property
    def sent(self) -> dict[str, Tensor]:
        """Q as broadcast to the participants, the Q their pass 2 projects on (``broadcast_basis``)."""
        return {n: broadcast_basis(q) for n, q in self.q.items()}


@dataclass(frozen=True)
class Noise:
    """Differential privacy under secure aggregation: the noise multiplier sigma and the secret
    generator the server draws each pass's noise from (``flora.common.privacy.release``)."""

    multiplier: float
    generator: torch.Generator


def released_sum(plan: RoundPlan, stage: int, summed: np.ndarray, noise: Noise | None = None) -> dict[str, Tensor]:
    """Pass ``stage``'s unmasked sum as its module blocks (float64), checked against the announced
    range first; under DP with its noise added: N(0, (sigma C max_k p_k)^2) per entry, drawn
    block by block in the vector's order, as the plain private release draws it (``noised``)."""
    total = decode(summed, plan.bits)
    check_sum(total, math.fsum(plan.weights) * plan.vector_bound, plan.bits, plan.clients, private=noise is not None)
    blocks = split(plan, stage, torch.from_numpy(total))
    if noise is None:
        return blocks
    if plan.dp_clip_norm is None:
        raise ValueError("secure_aggregation: noise needs the plan's dp_clip_norm (the sensitivity)")
    return noised(blocks, noise_std(noise.multiplier, plan.dp_clip_norm, plan.weights), noise.generator)


def server_step(
    plan: RoundPlan, stage: int, summed: np.ndarray, sketch: Sketch | None = None, dtype: torch.dtype = torch.float32,
    noise: Noise | None = None,
) -> Sketch | RoundResult:
    """Read pass ``stage``'s unmasked (and, under DP, noised) sum: after pass 1 of a two-pass
    round the ``Sketch`` to broadcast, else the round's ``RoundResult``."""
    blocks = released_sum(plan, stage, summed, noise)
    if plan.kind == FACTORS:  # the change: the frozen A beside T
        kept = plan.kept
        return _publish(plan, LoraAdapter({n: LoraPair(p.a.to(dtype), blocks[n].to(dtype)) for n, p in kept.pairs.items()},
                                          kept.scaling), dtype)
    dense = {m.name for m in plan.modules if m.dense}
    if stage == 1:
        sketch = Sketch({n: range_basis(y) for n, y in blocks.items() if n not in dense},
                        {n: d for n, d in blocks.items() if n in dense})
        return sketch if plan.passes == 2 else _finish_sketch(plan, {}, sketch, dtype)
    if sketch is None:
        raise ValueError("secure_aggregation: pass 2 needs the sketch pass 1 left")
    return _finish_sketch(plan, {n: assemble(sketch.q[n], p, broadcast_basis(sketch.q[n])) for n, p in blocks.items()},
                          sketch, dtype)


def _finish_sketch(plan: RoundPlan, pairs: dict[str, LoraPair], sketch: Sketch, dtype: torch.dtype) -> RoundResult:
    """Delta as one adapter, then the method's result. Like the plain stack, Delta's factors are
    left for the downlink to factorize (or send dense): Q and P^T per sketched module cut to the
    rank bound, a dense sum as factors of at most that rank, all zero-padded to one rank."""
    if plan.dp_clip_norm is None:  # exact sums: rank <= the bound, the rest is round-off
        bound = rank_bound(plan.method, plan.kept, plan.ranks, plan.scalings)
        pairs = {n: _cut(p, bound) for n, p in pairs.items()}
        pairs |= {n: _dense_pair(d, bound, plan.seed, n) for n, d in sketch.dense.items()}
    else:  # noisy sums have full rank: released as they are, as the plain private release is
        pairs |= {n: _dense_pair(d, min(d.shape), plan.seed, n) for n, d in sketch.dense.items()}
    width = max(p.a.shape[0] for p in pairs.values())
    change = LoraAdapter({n: pad_pair(LoraPair(p.a.to(dtype), p.b.to(dtype)), width) for n, p in sorted(pairs.items())}, 1.0)
    return _publish(plan, change, dtype)


def _publish(plan: RoundPlan, change: LoraAdapter, dtype: torch.dtype) -> RoundResult:
    """The method's result from the round's change (Delta; ffa: A beside T). Under DP it is the
    method's ``released``, the step that publishes a plain private round, so the result is that
    round's post-processing of the noisy sums; otherwise the finishes below."""
    if plan.dp_clip_norm is not None:
        return plan.method.released(plan.kept, list(zip(plan.ranks, plan.scalings)), plan.weights, change)
    return FINISH[plan.method.name](plan, change, dtype)


def _cut(pair: LoraPair, bound: int) -> LoraPair:
    """Q P^T (b = Q orthonormal, m columns) as its best approximation of rank ``bound``, the
    public bound on the sum's rank: the m - bound smallest directions are the sketch's
    oversampling, which holds only the fixed point's and float round-off. Left in, they can stand
    above the downlink's float64 rank cut (a clip bound far above the changes' norms makes the
    round-off relatively large), so the downlink sent rank m where plain's stack gives <= bound."""
    if pair.a.shape[0] <= bound:
        return pair
    # The top directions of P^T from its m x m Gram matrix (one GEMM and a small eigh, a few
    # times cheaper than an SVD of P^T): squaring resolves them to sqrt(eps) of the largest, so
    # what the cut may drop beyond the round-off is below 1e-8 of the sum, far below float32's.
    _, vectors = torch.linalg.eigh(pair.a @ pair.a.T)  # ascending eigenvalues; (m, m)
    top = vectors[:, -bound:]
    return LoraPair(a=top.T @ pair.a, b=pair.b @ top)


def _dense_pair(dense: Tensor, bound: int, seed: int, name: str) -> LoraPair:
    """A dense sum as factors of rank at most ``bound``, the public bound on its rank
    (``rank_bound``), so that the downlink meets it as it meets the plain stack of rank >= bound
    (factors where they are the smaller form, dense where not) and no module widens the others'
    padding beyond it. The factors come from one range-finder step on the sum the server holds,
    Q = orth(D Omega) and D = Q (Q^T D), exact because D has no more than ``bound`` independent
    columns. Where ``bound`` is no less than min(d_out, d_in): the sum beside an identity."""
    d_out, d_in = dense.shape
    columns = min(bound, d_out, d_in)
    if columns < min(d_out, d_in):
        q = range_basis(dense @ sketch_basis(d_in, columns, seed, name, dense.dtype))  # (d_out, columns)
        return LoraPair(a=q.T @ dense, b=q)
    if d_out <= d_in:
        return LoraPair(a=dense, b=torch.eye(d_out, dtype=dense.dtype))
    return LoraPair(a=torch.eye(d_in, dtype=dense.dtype), b=dense)


def _with_starts(plan: RoundPlan, change: LoraAdapter, dtype: torch.dtype) -> LoraAdapter:
    """Stacked factors of S + Delta, S = sum_k p_k init_k over the public starts."""
    inits = [plan.method.cached_start(plan.kept, r, s).init for r, s in zip(plan.ranks, plan.scalings)]
    return plus_starts(change, inits, plan.weights, dtype)


def _finish_flora(plan: RoundPlan, change: LoraAdapter, dtype: torch.dtype) -> RoundResult:
    return RoundResult(delta=change, kept=None)


def _finish_warm(plan: RoundPlan, change: LoraAdapter, dtype: torch.dtype) -> RoundResult:
    return RoundResult(delta=change, kept=canonical_adapter(_with_starts(plan, change, dtype), max(plan.ranks)))


def _finish_flexlora(plan: RoundPlan, change: LoraAdapter, dtype: torch.dtype) -> RoundResult:
    new = canonical_adapter(_with_starts(plan, change, dtype))
    return RoundResult(delta=difference(new, plan.kept, dtype), kept=new)


def _finish_ffa(plan: RoundPlan, change: LoraAdapter, dtype: torch.dtype) -> RoundResult:
    kept, starts = plan.kept, {}
    for rank, weight in zip(plan.ranks, plan.weights):
        starts[rank] = starts.get(rank, 0.0) + weight
    next_kept = {}
    for name, (a, b) in kept.pairs.items():
        start = sum(w * pad_pair(LoraPair(a[:r], b[:, :r]), kept.rank).b.to(dtype) for r, w in starts.items())
        next_kept[name] = LoraPair(a.to(dtype), start + change.pairs[name].b)  # T: (d_out, r_max)
    return RoundResult(delta=change, kept=LoraAdapter(next_kept, kept.scaling))


FINISH: dict[str, Callable[[RoundPlan, LoraAdapter, torch.dtype], RoundResult]] = {
    "flora": _finish_flora, "flora-warm": _finish_warm, "flexlora": _finish_flexlora, "ffa": _finish_ffa,
}
