"""A global update as the downlink carries it: per module, factors of its own rank or a dense delta.

A ``GlobalUpdate`` maps each target module's name to one ``ModuleUpdate``: either a ``LoraPair``
(a (rho, d_in), b (d_out, rho), scaling 1, so the module's update is b @ a) or a dense
(d_out, d_in) tensor that is the update itself. Unlike a ``LoraAdapter`` the rank differs from
module to module, because each module's canonical rank is that of its own aggregate
(``flora.common.canonical``). The carried remainder of a lossy downlink has the same form.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import torch
from torch import Tensor

from flora.common.canonical import canonical_pair
from flora.common.lora import LoraPair

ModuleUpdate = Union[LoraPair, Tensor]
GlobalUpdate = Mapping[str, ModuleUpdate]


def is_factors(part: ModuleUpdate) -> bool:
    """True for a factor pair, False for a dense delta."""
    return isinstance(part, LoraPair)


def module_delta(part: ModuleUpdate, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (d_out, d_in) update a module part stands for, computed in ``dtype``."""
    if is_factors(part):
        return part.b.to(dtype) @ part.a.to(dtype)
    return part.to(dtype)


def module_shape(part: ModuleUpdate) -> tuple[int, int]:
    """(d_out, d_in) of the module the part updates."""
    return (part.b.shape[0], part.a.shape[1]) if is_factors(part) else tuple(part.shape)


def module_numel(part: ModuleUpdate) -> int:
    """Values the part holds on the wire: rho (d_out + d_in) for factors, d_out d_in for dense."""
    return part.a.numel() + part.b.numel() if is_factors(part) else part.numel()


def module_energy(part: ModuleUpdate) -> float:
    """|update|_F^2, without forming the dense product of factors: trace(B^T B A A^T) in float64.

    A dense part is reduced in its own precision (a float32 sum is good to about 1e-7 relative,
    ample for the downlink's report, and a twentieth of the cost of a float64 copy of a 4096 x
    4096 delta), and in float64 only where that overflows.
    """
    if is_factors(part):
        a, b = part.a.double(), part.b.double()
        return float(((b.T @ b) * (a @ a.T)).sum())
    norm = float(torch.linalg.vector_norm(part))
    return norm * norm if math.isfinite(norm) else float(part.double().square().sum())


def as_pair(part: ModuleUpdate) -> LoraPair:
    """Factors of any part: a dense delta D becomes (D, I) or (I, D), whichever side is smaller.

    This is what lets dense deltas join a stack and go through the same canonical factorization.
    """
    if is_factors(part):
        return part
    d_out, d_in = part.shape
    if d_out <= d_in:
        return LoraPair(part, torch.eye(d_out, dtype=part.dtype, device=part.device))  # (d_out, d_in), (d_out, d_out)
    return LoraPair(torch.eye(d_in, dtype=part.dtype, device=part.device), part)  # (d_in, d_in), (d_out, d_in)


def concat_pairs(pairs: Sequence[LoraPair], dtype: torch.dtype) -> LoraPair:
    """One pair whose product is the sum of the pairs' products (stacked along the rank axis)."""
    return LoraPair(torch.cat([p.a.to(dtype) for p in pairs], 0), torch.cat([p.b.to(dtype) for p in pairs], 1))


def update_numel(update: GlobalUpdate) -> int:
    """Values of a whole update on the wire."""
    return sum(module_numel(part) for part in update.values())


def cumulative_factors(updates: Iterable[GlobalUpdate]) -> dict[str, LoraPair]:
    """Canonical factors of the sum of several updates, module by module (e.g. every round so far).

    Folded one update at a time, so the stack being factored never exceeds min(d_out, d_in) plus
    one update's rank; the result's rank is bounded by min(d_out, d_in) and it stays exact.
    """
    total: dict[str, LoraPair] = {}
    for update in updates:
        for name, part in update.items():
            pairs = [total[name], as_pair(part)] if name in total else [as_pair(part)]
            total[name] = canonical_pair(concat_pairs(pairs, torch.float64), out_dtype=torch.float64)
    return {name: LoraPair(p.a.float(), p.b.float()) for name, p in total.items()}
