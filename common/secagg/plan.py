"""What each client uploads in each masked pass of a round, and how the server reads the sums.

Under secure aggregation the server sees only sums, so each aggregation method must be written
as sums of things a client can compute alone (issue 30, item 2):

- ``flora``, ``flora-warm``, ``flexlora`` (kind ``sketch``): client k's change
  D_k = p_k c_k (s_k B_k A_k - init_k) per module, through the two-pass range finder of
  ``flora.common.sketch``: pass 1 uploads D_k Omega (d_out x m, Omega seeded and public), the
  server orthonormalizes the unmasked sum to Q and broadcasts it, pass 2 uploads D_k^T Q
  (d_in x m), and Q (sum_k D_k^T Q)^T = sum_k D_k exactly, because m is at least the rank of
  the sum: the sum of the clients' ranks, plus the largest start's rank when starts are warm.
  A module where two passes would move more numbers than its dense change
  (``sketch_width``, the private release's rule too) sends D_k itself in pass 1 instead. The method's next kept LoRA comes
  from that sum and the public starts alone (``flora.common.secagg.finish``).
- ``ffa`` (kind ``factors``): A is frozen and public, so the weighted sum of the B changes,
  sum_k p_k c_k pad(B_k - B_start,k), is the whole round: one pass of d_out x r_max per module.
- ``fedit``, ``zeropad``, ``fedex`` are refused (``check_secure``): they average the factors
  themselves, which the clip bound does not bound, so no fixed-point scale can be announced.

Weights p_k are fixed when the round opens and clip factors c_k come from the announced clip
bound C (under differential privacy also from the DP clip norm, in the norm of what the release
noises: the server then adds the noise to the unmasked sums, ``flora.common.secagg.finish``);
each client applies both before masking (``flora.common.secagg.contribution``), so
every contribution's Frobenius norm is at most p_k times ``vector_bound``. The layout of each
pass's vector is in protos/PROTOCOL.md, "Secure aggregation: the passes".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flora.common.lora import LoraAdapter
from flora.common.methods import AggregationMethod
from flora.common.omega import sketch_basis
from flora.common.robust import RobustPolicy, decide
from flora.common.secagg.fixedpoint import choose_scale
from flora.common.sketch import rank_bound as change_rank_bound, sketch_width

SKETCH, FACTORS = "sketch", "factors"
KINDS: dict[str, str] = {"flora": SKETCH, "flora-warm": SKETCH, "flexlora": SKETCH, "ffa": FACTORS}
_UNBOUNDED = ("the clip bound limits the change of their product, not the factors, so no fixed-point scale can be "
              "announced that every honest upload is sure to fit (and clipping the factors instead would change "
              "what the method merges)")
REFUSALS: dict[str, str] = {
    "fedit": "averages the factors A and B themselves; " + _UNBOUNDED,
    "zeropad": "averages the factors A and B themselves; " + _UNBOUNDED,
    "fedex": "keeps the average of the factors A and B as its next start; " + _UNBOUNDED
             + " (its merged change alone would fit the two-pass sketch)",
}
BOUND_SLACK = 1e-9  # relative: projections by orthonormal Omega and Q are no larger than the change, up to round-off


def check_secure(method: AggregationMethod) -> None:
    """Refuse at start-up (ValueError naming the method and why) a method that cannot run under
    secure aggregation; return quietly for one that can."""
    if method.name in KINDS:
        return
    reason = REFUSALS.get(method.name, "has no secure-aggregation plan")
    supported = ", ".join(KINDS)
    raise ValueError(f"secure_aggregation: method {method.name} cannot run under secure aggregation: it {reason}; "
                     f"use one of {supported}")


@dataclass(frozen=True)
class ModulePlan:
    """One module's part of the round: its shape and how it travels."""

    name: str
    d_out: int
    d_in: int
    columns: int  # sketch: the sketch's m (0 when dense); factors: the global LoRA's rank
    dense: bool = False  # sketch only: D_k itself in pass 1, nothing in pass 2


@dataclass(frozen=True)
class RoundPlan:
    """Everything the server and every participant know when a round opens (all public)."""

    method: AggregationMethod
    kind: str  # SKETCH or FACTORS
    modules: tuple[ModulePlan, ...]  # in sorted name order: the wire order
    kept: LoraAdapter | None  # the global LoRA the round starts from
    ranks: tuple[int, ...]  # client k's rank and scaling, as announced at round open
    scalings: tuple[float, ...]
    weights: tuple[float, ...]  # p_k, fixed at round open
    clip_norm: float | None  # C: each client clips its change |s B A - init|_F to at most this (None: DP's clip alone)
    vector_bound: float  # any client's vector in any pass has norm <= p_k times this
    bits: int  # the fixed-point scale 2^bits (``choose_scale``)
    seed: int  # Omega's seed for this round
    dp_clip_norm: float | None = None  # DP: each client also clips the released quantity's norm to this

    @property
    def passes(self) -> int:
        """Masked passes of the round: two while any module is sketched, else one."""
        return 2 if self.kind == SKETCH and any(not m.dense for m in self.modules) else 1

    @property
    def clients(self) -> int:
        """K, the participants of the round."""
        return len(self.ranks)


def round_weights(claimed: Sequence[float], max_weight_share: float | None) -> list[float]:
    """p_k at round open: the claims normalized and capped by ``max_weight_share`` as the plain
    path caps them (``flora.common.robust.decide``), without norms, which the server never sees."""
    policy = RobustPolicy(max_weight_share=max_weight_share)
    return [d.weight for d in decide([1.0] * len(claimed), claimed, policy)]


def plan_round(
    method: AggregationMethod, kept: LoraAdapter | None, shapes: Mapping[str, tuple[int, int]], ranks: Sequence[int],
    scalings: Sequence[float], weights: Sequence[float], clip_norm: float | None, seed: int, clients: int | None = None,
    dp_clip_norm: float | None = None, dense: bool = False,
) -> RoundPlan:
    """The round's plan from public facts; ``clients`` (default: this round's) sizes the fixed point.

    Under differential privacy (``dp_clip_norm`` set) each client also clips, in the norm of what
    the release noises (its whole change; ffa: its B change), to ``dp_clip_norm``, so every
    vector is bounded by it, and ``clip_norm`` may be None (the plain private round's clip alone);
    ``dense`` (the DP dense release) sends every module dense in one pass.
    """
    check_secure(method)
    if clip_norm is None and dp_clip_norm is None:
        raise ValueError("secure_aggregation: a round needs a clip bound (clip_norm, or dp_clip_norm under DP)")
    for name, value in (("clip_norm", clip_norm), ("dp_clip_norm", dp_clip_norm)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"secure_aggregation: {name} must be a positive finite number, got {value}")
    if not ranks or len(ranks) != len(scalings) or len(ranks) != len(weights):
        raise ValueError(f"secure_aggregation: need one rank, scaling and weight per client, got "
                         f"{len(ranks)}, {len(scalings)}, {len(weights)}")
    if not all(0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"secure_aggregation: weights must lie in [0, 1], got {list(weights)}")
    if clients is not None and clients < len(ranks):
        raise ValueError(f"secure_aggregation: clients {clients} is below this round's {len(ranks)} participants")
    method.validate(list(ranks), list(scalings))
    kind = KINDS[method.name]
    if kind == SKETCH:
        modules = _sketch_modules(method, kept, shapes, ranks, scalings, dense)
        bound = min(clip_norm or math.inf, dp_clip_norm or math.inf) * (1 + BOUND_SLACK)
    elif dp_clip_norm is not None:  # ffa under DP: each client clips |dB|_F itself, the released quantity
        modules, bound = _factor_modules(kept, shapes), dp_clip_norm * (1 + BOUND_SLACK)
    else:
        modules, bound = _factor_modules(kept, shapes), _factor_bound(kept, clip_norm)
    return RoundPlan(method, kind, modules, kept, tuple(ranks), tuple(scalings), tuple(weights), clip_norm, bound,
                     choose_scale(bound, clients or len(ranks)), seed, dp_clip_norm)


def _sketch_modules(
    method: AggregationMethod, kept: LoraAdapter | None, shapes: Mapping[str, tuple[int, int]],
    ranks: Sequence[int], scalings: Sequence[float], dense: bool,
) -> tuple[ModulePlan, ...]:
    """Per module the sketch's m from the rank bound, or dense where that moves fewer numbers
    (``sketch_width``, the private release's rule too) or where ``dense`` asks for it."""
    bound = rank_bound(method, kept, ranks, scalings)
    modules = []
    for name in sorted(shapes):
        d_out, d_in = shapes[name]
        columns = 0 if dense else sketch_width(bound, d_out, d_in)
        modules.append(ModulePlan(name, d_out, d_in, columns, columns == 0))
    return tuple(modules)


def rank_bound(method: AggregationMethod, kept: LoraAdapter | None, ranks: Sequence[int], scalings: Sequence[float]) -> int:
    """The most the rank of any module's summed change can be, from public facts: the sum of the
    clients' ranks, plus the largest start's rank when starts are warm (they nest in the kept LoRA)."""
    starts = [method.cached_start(kept, r, s).init for r, s in zip(ranks, scalings)]
    return change_rank_bound(ranks, [init.rank for init in starts if init is not None])


def _factor_modules(kept: LoraAdapter | None, shapes: Mapping[str, tuple[int, int]]) -> tuple[ModulePlan, ...]:
    """ffa: the global LoRA's B shape (d_out x r_max) per module."""
    if kept is None or set(kept.pairs) != set(shapes):
        raise ValueError("secure_aggregation: ffa needs the kept global LoRA of every module (its frozen A)")
    return tuple(ModulePlan(n, *shapes[n], columns=kept.rank) for n in sorted(shapes))


def _factor_bound(kept: LoraAdapter, clip_norm: float) -> float:
    """The bound on sum_n |dB_n|_F given |s dB A|_F <= C over all modules: C / (s sigma), sigma
    the smallest singular value of any module's frozen A (a leading block of A's rows has none
    smaller, by interlacing), so any client rank is covered."""
    sigma = min(float(torch.linalg.svdvals(p.a.double())[-1]) for p in kept.pairs.values())
    if not sigma > 0:
        raise ValueError("secure_aggregation: ffa's frozen A is rank-deficient, so a B change has no bound")
    return clip_norm / (abs(kept.scaling) * sigma) * (1 + 1e-6)


# --- the layout of each pass's vector ----------------------------------------------------------


def block_shapes(plan: RoundPlan, stage: int) -> list[tuple[str, tuple[int, int]]]:
    """The (module, shape) blocks of pass ``stage``'s vector, in order; each block row-major."""
    if stage not in range(1, plan.passes + 1):
        raise ValueError(f"secure_aggregation: stage {stage} outside 1..{plan.passes} of this round")
    blocks = []
    for m in plan.modules:
        if plan.kind == FACTORS:
            blocks.append((m.name, (m.d_out, m.columns)))
        elif stage == 1:
            blocks.append((m.name, (m.d_out, m.d_in) if m.dense else (m.d_out, m.columns)))
        elif not m.dense:
            blocks.append((m.name, (m.d_in, m.columns)))
    return blocks


def vector_length(plan: RoundPlan, stage: int) -> int:
    """Entries of pass ``stage``'s vector (8 bytes each on the wire)."""
    return sum(rows * cols for _, (rows, cols) in block_shapes(plan, stage))


def split(plan: RoundPlan, stage: int, flat: Tensor) -> dict[str, Tensor]:
    """A pass's flat vector cut back into its module blocks (views)."""
    blocks, offset = {}, 0
    for name, (rows, cols) in block_shapes(plan, stage):
        blocks[name] = flat[offset : offset + rows * cols].view(rows, cols)
        offset += rows * cols
    if offset != flat.numel():
        raise ValueError(f"secure_aggregation: pass {stage} vector has {flat.numel()} entries, the plan {offset}")
    return blocks


def sketch_bases(plan: RoundPlan) -> dict[str, Tensor]:
    """Omega per sketched module, from the round's seed and the module's name alone (public,
    ``flora.common.omega``: the private release's Omega for the same round)."""
    return {m.name: sketch_basis(m.d_in, m.columns, plan.seed, m.name)
            for m in plan.modules if plan.kind == SKETCH and not m.dense}
