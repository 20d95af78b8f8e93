"""Defences of an aggregate against a lying or broken client: norms, weight caps, clipping, outliers.

Pure functions over numbers and tensors, no I/O (DESIGN.md section 6, "Robustness"). The server
measures every update's size as the Frobenius norm of what the client changed, s B A - s0 B0 A0
with (B0, A0) the LoRA it started from (nothing for a fresh start; a warm start's init, which the
exact methods also removed from the model), computed from Gram matrices so that it costs
O(r^2 (d_in + d_out)) and cannot overflow; bounds that norm at upload; caps any one client's share
of the weights (the header's ``num_examples`` is a claim nothing verifies); and may clip or reject
updates by norm. A clip factor c_k <= 1 goes to the method's ``merge``, which scales the client's
change by it (``flora.common.methods.base``): the merged update counts init_k + c_k (s_k B_k A_k -
init_k) for client k, exactly sum_k p_k c_k s_k B_k A_k for fresh-start flora.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flora.common.lora import LoraAdapter, LoraPair

# Weight capping needs at least this many clients: with two, a cap of 1/2 forces uniform weights.
MIN_CLIENTS_TO_CAP = 3
# Below this the uncapped weights' total is round-off (or subnormal): share the rest evenly instead.
_TINY = 1e-200


def delta_norm_sq(a: Tensor, b: Tensor, scaling: float) -> float:
    """|s B A|_F^2 = s^2 tr((B^T B)(A A^T)), in float64 (exact in exact arithmetic).

    Through the two r x r Grams while r^2 <= d_out x d_in (the usual thin LoRA: no d_out x d_in
    product), else through the product itself: a rank above the module's width (bench/transport.py
    uploads rank 37,449 on 64-wide modules) would otherwise need two r x r float64 matrices, 11 GB
    each. float64 holds the square of any float32 product: a value of 3.4e38 squared and summed
    over a million terms is about 1e83, far below float64's 1.8e308.
    """
    # numpy's products, not torch's: on a busy machine torch's threaded matmul of these thin
    # matrices was measured 80x slower than numpy's, and this runs on every upload.
    a64 = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    b64 = b.detach().to(device="cpu", dtype=torch.float64).numpy()
    (rank, d_in), d_out = a64.shape, b64.shape[0]
    if rank * rank > d_out * d_in:
        product = b64 @ a64  # (d_out, d_in)
        return float(np.sum(product * product)) * scaling * scaling
    gram_b = b64.T @ b64  # (r, r)
    gram_a = a64 @ a64.T  # (r, r)
    trace = float(np.sum(gram_b * gram_a))  # tr(X Y) = sum(X * Y^T); both Grams are symmetric
    return max(trace, 0.0) * scaling * scaling


def update_norm(adapter: LoraAdapter) -> float:
    """The Frobenius norm of the whole weight change of an adapter, over all its modules."""
    return math.sqrt(sum(delta_norm_sq(a, b, adapter.scaling) for a, b in adapter.pairs.values()))


def change_norm_sq(a: Tensor, b: Tensor, scaling: float, start: LoraPair | None, start_scaling: float) -> float:
    """|s B A - s0 B0 A0|_F^2 of one module, in float64: the stacked factors [B, B0] [s A; -s0 A0]
    through ``delta_norm_sq`` (no d_out x d_in product for thin LoRAs)."""
    if start is None:
        return delta_norm_sq(a, b, scaling)
    a0, b0 = (t.detach().to(device="cpu", dtype=torch.float64) for t in start)
    a64, b64 = (t.detach().to(device="cpu", dtype=torch.float64) for t in (a, b))
    return delta_norm_sq(torch.cat([a64 * scaling, a0 * -start_scaling]), torch.cat([b64, b0], dim=1), 1.0)


def change_norm(update: LoraAdapter, start: LoraAdapter | None) -> float:
    """|s B A - s0 B0 A0|_F over all modules: the norm of what a client changed from its start."""
    if start is None:
        return update_norm(update)
    return math.sqrt(sum(change_norm_sq(a, b, update.scaling, start.pairs[n], start.scaling)
                         for n, (a, b) in update.pairs.items()))


def factor_step(update: LoraAdapter, init: LoraAdapter, clip: float) -> float:
    """The t in [0, 1] whose factors init + t (update - init) change the product from init's by
    ``clip`` times update's change, in Frobenius norm: how a method that averages factors clips.

    With dA = A - A0, dB = B - B0 (one scaling s), the change at t is t L + t^2 Q, L = s (dB A0 +
    B0 dA), Q = s dB dA, so its squared norm t^2 |L|^2 + 2 t^3 <L, Q> + t^4 |Q|^2 is a polynomial
    whose three coefficients come from r x r products; it is 0 at t = 0 and continuous, so
    bisection finds t (to float64 resolution) without forming a d_out x d_in matrix.
    """
    ll = lq = qq = 0.0
    for name, (a, b) in update.pairs.items():
        a0, b0 = (t.detach().to(device="cpu", dtype=torch.float64).numpy() for t in init.pairs[name])
        a64, b64 = (t.detach().to(device="cpu", dtype=torch.float64).numpy() for t in (a, b))
        da, db = (a64 - a0) * update.scaling, b64 - b0
        a_l, b_l = np.vstack([a0 * update.scaling, da]), np.hstack([db, b0])
        ll += _inner(a_l, b_l, a_l, b_l)
        lq += _inner(a_l, b_l, da, db)
        qq += _inner(da, db, da, db)

    def norm_sq(t: float) -> float:
        return t * t * (ll + t * (2.0 * lq + t * qq))

    target, low, high = clip * clip * norm_sq(1.0), 0.0, 1.0
    for _ in range(64):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if norm_sq(middle) < target else (low, middle)
    return high


def _inner(a1: np.ndarray, b1: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> float:
    """<B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T)), through r1 x r2 matrices."""
    return float(np.sum((b1.T @ b2) * (a1 @ a2.T)))


def weights_norm(weights: Mapping[str, Tensor]) -> float:
    """The Frobenius norm of a set of weight matrices taken together, in float64."""
    return math.sqrt(sum(float(torch.linalg.matrix_norm(w.detach().to(torch.float64)) ** 2) for w in weights.values()))


def cap_shares(weights: Sequence[float], cap: float) -> list[float]:
    """Weights summing to 1 with none above ``cap``, by water-filling.

    Every weight above the cap is set to it and the rest of the mass is shared among the others
    in proportion to their weights; repeated until no weight passes the cap (at most K passes),
    so a capped weight never exceeds the cap after renormalisation. Needs ``cap * K >= 1``.
    """
    count = len(weights)
    if count == 0 or not 0 < cap <= 1:
        raise ValueError(f"cap_shares: cap must be in (0, 1] and weights non-empty, got cap {cap} and {count} weights")
    if cap * count < 1 - 1e-12:
        raise ValueError(f"cap_shares: a cap of {cap} cannot hold {count} weights summing to 1")
    total = math.fsum(weights)
    result = [w / total for w in weights]
    capped: set[int] = set()
    for _ in range(count):
        over = {k for k, w in enumerate(result) if k not in capped and w > cap}
        if not over:
            break
        capped |= over
        free = [k for k in range(count) if k not in capped]
        left = 1.0 - cap * len(capped)
        free_total = math.fsum(result[k] for k in free)
        for k in capped:
            result[k] = cap
        for k in free:
            result[k] = left * result[k] / free_total if free_total > _TINY else left / len(free)
    return result


@dataclass(frozen=True)
class RobustPolicy:
    """The run's robustness settings (from the server settings); None disables a rule."""

    max_weight_share: float | None = 0.5
    clip_norm: float | None = None  # fixed bound on the change's norm |s B A - s0 B0 A0|_F
    clip_median_multiple: float | None = None  # adaptive bound: this multiple of the round's median norm
    reject_median_multiple: float | None = None  # reject updates whose norm exceeds this multiple of the median


@dataclass(frozen=True)
class Decision:
    """What the robustness rules did to one client's update, for the aggregate and the history."""

    norm: float
    raw_weight: float
    weight: float  # final p_k (0 when rejected)
    clip_factor: float  # scales the client's change from its start; 1.0 when not clipped
    rejected: bool = False
    capped: bool = False


def decide(norms: Sequence[float], weights: Sequence[float], policy: RobustPolicy) -> list[Decision]:
    """Apply outlier rejection, the weight-share cap and clipping to one round's updates.

    Rejection and the adaptive bounds compare each norm with the median of the round's norms
    (robust to a minority of liars); the cap applies with at least MIN_CLIENTS_TO_CAP updates
    left. If every update would be rejected, none is.
    """
    count = len(norms)
    median = statistics.median(norms) if norms else 0.0
    rejected = [False] * count
    if policy.reject_median_multiple is not None and count >= MIN_CLIENTS_TO_CAP and median > 0:
        rejected = [n > policy.reject_median_multiple * median for n in norms]
    kept = [k for k in range(count) if not rejected[k]]
    kept_weights = [weights[k] for k in kept]
    total = math.fsum(kept_weights)
    shares = [w / total for w in kept_weights] if total > 0 else [1.0 / len(kept)] * len(kept)
    cap = policy.max_weight_share
    capped_shares = shares
    if cap is not None and len(kept) >= MIN_CLIENTS_TO_CAP and cap * len(kept) >= 1:
        capped_shares = cap_shares(shares, cap)
    final = [0.0] * count
    capped = [False] * count
    for k, before, after in zip(kept, shares, capped_shares):
        final[k] = after
        capped[k] = after < before - 1e-12
    bound = _clip_bound(policy, median)
    return [
        Decision(norm=norms[k], raw_weight=weights[k], weight=final[k], rejected=rejected[k], capped=capped[k],
                 clip_factor=min(1.0, bound / norms[k]) if bound is not None and norms[k] > bound else 1.0)
        for k in range(count)
    ]


def robust_inputs(
    adapters: Sequence[LoraAdapter], inits: Sequence[LoraAdapter | None], claimed: Sequence[float], policy: RobustPolicy
) -> tuple[list[LoraAdapter], list[float], list[float], list[Decision]]:
    """What to aggregate from a round's updates under ``policy``, each measured against the LoRA
    its client started from (``inits``, None: fresh): the kept adapters, their final weights and
    clip factors (for the method's ``merge``), and one decision per update (rejected ones
    included) for the history."""
    decisions = decide([change_norm(a, init) for a, init in zip(adapters, inits)], claimed, policy)
    kept = [k for k, d in enumerate(decisions) if not d.rejected]
    return ([adapters[k] for k in kept], [decisions[k].weight for k in kept], [decisions[k].clip_factor for k in kept],
            decisions)


def _clip_bound(policy: RobustPolicy, median: float) -> float | None:
    """The tighter of the fixed and the adaptive clipping bound, if any is set."""
    bounds = []
    if policy.clip_norm is not None:
        bounds.append(policy.clip_norm)
    if policy.clip_median_multiple is not None and median > 0:
        bounds.append(policy.clip_median_multiple * median)
    return min(bounds) if bounds else None
