"""The client's side of a secure round: clip and weight its change, project it, encode it.

The server can no longer look at an upload, so the rules it applied to each one move here
(issue 30, item 3): client k measures its change from its start, |s_k B_k A_k - init_k|_F over
all modules, exactly as the plain server does (``flora.common.robust.change_norm``), scales it by
c_k = min(1, C / norm) for the announced clip bound C and by its weight p_k fixed at round open,
and only then projects and encodes it. Under differential privacy it also clips, to the DP clip
norm and in the norm of what the release noises (its whole change; ffa: |B_k - B_start|_F), the
clip a plain private round applies at the server (``flora.common.privacy.private_round``); its
one clip factor serves both passes. Its vector in every pass then has norm <= p_k C (Omega
and Q have orthonormal columns), which is what the fixed-point scale was chosen for; a vector
that is not (a bug) is refused here rather than uploaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flora.common.aggregation import flora_stack
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.privacy.release import b_change_norm, clip_factor
from flora.common.robust import change_norm
from flora.common.secagg.fixedpoint import encode
from flora.common.secagg.plan import FACTORS, SKETCH, RoundPlan, block_shapes
from flora.common.sketch import project_columns, project_rows


@dataclass(frozen=True)
class ClientChange:
    """One client's clipped, weighted change per module: factors of p c (s B A - init) for a
    sketched round, p c pad(B - B_start) for ffa; a module the client left out is absent (zero)."""

    index: int
    parts: Mapping[str, LoraPair | Tensor]
    clip: float  # c_k: 1.0 when the change was within the bound
    norm: float  # the change's norm before clipping


def client_change(plan: RoundPlan, index: int, update: LoraAdapter) -> ClientChange:
    """Client ``index``'s contribution before projection, from its trained LoRA ``update``."""
    rank, scaling = plan.ranks[index], plan.scalings[index]
    if update.rank != rank or not math.isclose(update.scaling, scaling, rel_tol=1e-9):
        raise ValueError(f"secure_aggregation: client {index} announced rank {rank} and scaling {scaling:g}, "
                         f"its update has rank {update.rank} and scaling {update.scaling:g}")
    unknown = set(update.pairs) - {m.name for m in plan.modules}
    if unknown:
        raise ValueError(f"secure_aggregation: client {index} updates module {sorted(unknown)[0]!r}, not in the run")
    init = plan.method.cached_start(plan.kept, rank, scaling).init
    if plan.kind == FACTORS:  # the frozen A is the kept one; only B was trained
        update = LoraAdapter({n: LoraPair(plan.kept.pairs[n].a[:rank], p.b) for n, p in update.pairs.items()}, scaling)
    if init is not None:
        init = LoraAdapter({n: init.pairs[n] for n in update.pairs}, init.scaling)
    norm = change_norm(update, init)
    clip = 1.0 if plan.clip_norm is None else clip_factor(norm, plan.clip_norm)
    if plan.dp_clip_norm is not None:  # DP: also within its clip norm, in the norm of what is released
        released = norm if plan.kind == SKETCH else b_change_norm(update, init)
        clip = min(clip, clip_factor(released, plan.dp_clip_norm))
    factor = plan.weights[index] * clip
    if plan.kind == FACTORS:
        width = plan.kept.rank
        parts = {n: torch.nn.functional.pad(factor * (p.b.double() - init.pairs[n].b.double()), (0, width - rank))
                 for n, p in update.pairs.items()}  # (d_out, r_max)
    elif init is None:
        parts = dict(flora_stack([update], [factor], torch.float64).pairs)
    else:
        parts = dict(flora_stack([update, init], [factor, -factor], torch.float64).pairs)
    return ClientChange(index, parts, clip, norm)


def client_contribution(plan: RoundPlan, stage: int, change: ClientChange, bases: Mapping[str, Tensor]) -> list[np.ndarray]:
    """The client's uint64 blocks of pass ``stage``, one per block of ``block_shapes`` (module
    order, each row-major): D Omega or the dense D in pass 1, D^T Q in pass 2, the B change for
    ffa. ``bases`` is Omega per sketched module in pass 1 (``sketch_bases``), the broadcast Q in
    pass 2, unused for ffa. Concatenated, they are the vector the client masks and uploads."""
    sketched = {m.name for m in plan.modules if plan.kind == SKETCH and not m.dense}
    blocks = [_block(plan, stage, change.parts.get(name), shape, bases[name] if name in sketched else None)
              for name, shape in block_shapes(plan, stage)]
    norm = math.sqrt(math.fsum(float(torch.sum(b * b)) for b in blocks))
    limit = plan.weights[change.index] * plan.vector_bound
    if norm > limit:
        raise ValueError(f"secure_aggregation: client {change.index}'s pass {stage} vector has norm {norm:.6g}, "
                         f"above its bound {limit:.6g}; not uploaded")
    return [encode(b.numpy(), plan.bits) for b in blocks]


def _block(plan: RoundPlan, stage: int, part: LoraPair | Tensor | None, shape: tuple[int, int], basis: Tensor | None) -> Tensor:
    """One module's float64 block of the pass, zeros for a module the client left out."""
    if part is None:
        return torch.zeros(shape, dtype=torch.float64)
    if plan.kind == FACTORS:
        return part
    if basis is None:  # a dense module: pass 1 only
        return part.b @ part.a  # (d_out, d_in)
    return project_columns(part, basis) if stage == 1 else project_rows(part, basis)
