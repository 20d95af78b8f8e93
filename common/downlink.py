"""What the server sends for one round: per module the smaller exact form, or a bounded lossy one.

Exact (the default): a module's aggregate travels as its canonical factors
(``flora.common.canonical``, rho (d_out + d_in) values) or as the dense delta (d_out d_in values),
whichever is smaller, so the downlink is never larger than the dense delta nor than the stack,
and it depends on the sum of the clients' updates alone.

Lossy (``DownlinkPolicy`` with ``energy`` < 1, a ``max_rank`` or a half-precision ``dtype``): the
leading k canonical directions are sent, k the smallest rank that keeps ``energy`` of the
module's squared Frobenius norm (FLoRIST, arXiv 2506.09199) and at most ``max_rank``, in
``dtype``. Error feedback keeps it exact over a run: what was not sent (the tail directions and
the rounding to ``dtype``) is returned as the remainder, which the caller adds to the next round's
aggregate. Server and clients merge exactly the tensors sent, so their models stay identical, and
sum(sent) + final remainder = sum of the rounds' aggregates.

A module whose carried remainder is dense (the rounding of a dense delta) is sent dense: its
aggregate is then full rank, and factoring it would cost an O(d^3) SVD for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flora.common.canonical import canonical_pair, singular_values
from flora.common.lora import LoraPair
from flora.common.update import GlobalUpdate, ModuleUpdate, concat_pairs, is_factors, module_delta, module_energy

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DownlinkPolicy:
    """How much of each module's aggregate one round sends; the defaults send it exactly."""

    energy: float = 1.0
    max_rank: int | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"downlink energy {self.energy} must be in (0, 1]")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"downlink max_rank {self.max_rank} must be >= 1")
        if self.dtype not in WIRE_DTYPES.values():
            raise ValueError(f"downlink dtype {self.dtype} is not one of {', '.join(WIRE_DTYPES)}")

    @property
    def lossy(self) -> bool:
        """Whether a round may send less than its aggregate (and so carries a remainder)."""
        return self.energy < 1.0 or self.max_rank is not None or self.dtype != torch.float32


@dataclass(frozen=True)
class ModuleReport:
    """What one module's downlink holds and what it left behind."""

    form: str  # "factors" or "dense"
    rank: int | None  # rho of the factors sent; None for dense
    numel: int
    energy: float  # |aggregate|_F^2, remainder carried in included
    remainder_energy: float  # |what is carried to the next round|_F^2


@dataclass(frozen=True)
class Downlink:
    """One round's downlink: the update everyone merges, the remainder the server keeps, the figures."""

    update: dict[str, ModuleUpdate]
    remainder: dict[str, ModuleUpdate]
    modules: dict[str, ModuleReport] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        """Figures for the round history: ranks sent, forms, retained energy, remainder norm.

        Retained energy is 1 - |remainder|^2 / |aggregate|^2 over all modules: the share of the
        round's aggregate (carried remainder included) that reached the clients.
        """
        ranks = [m.rank for m in self.modules.values() if m.rank is not None]
        energy = sum(m.energy for m in self.modules.values())
        carried = sum(m.remainder_energy for m in self.modules.values())
        return {
            "factor_modules": len(ranks),
            "dense_modules": len(self.modules) - len(ranks),
            "rank_min": min(ranks, default=None),
            "rank_max": max(ranks, default=None),
            "retained_energy": 1.0 - carried / energy if energy > 0 else 1.0,
            "remainder_norm": math.sqrt(carried),
        }


def plan_downlink(
    stack: Mapping[str, LoraPair], remainder: GlobalUpdate | None = None, policy: DownlinkPolicy = DownlinkPolicy()
) -> Downlink:
    """The downlink of a round whose stacked aggregate is ``stack`` (scaling 1 per module).

    ``remainder`` is what earlier rounds did not send; it joins this round's aggregate first.
    """
    remainder = remainder or {}
    if unknown := sorted(set(remainder) - set(stack)):
        raise ValueError(f"the carried remainder has module {unknown[0]!r}, which the aggregate lacks")
    update, rest, modules = {}, {}, {}
    for name in sorted(stack):
        device = stack[name].a.device
        parts = [stack[name]] + ([_on(remainder[name], device)] if name in remainder else [])
        sent, left, report = _module_downlink(parts, policy)
        update[name], modules[name] = sent, report
        if left is not None:
            rest[name] = left
    return Downlink(update, rest, modules)


def _module_downlink(parts: list[ModuleUpdate], policy: DownlinkPolicy) -> tuple[ModuleUpdate, ModuleUpdate | None, ModuleReport]:
    """(sent, carried or None, report) for one module's aggregate ``sum(parts)``."""
    if not all(is_factors(p) for p in parts):
        return _dense(sum(module_delta(p, torch.float64) for p in parts), policy)
    pair = parts[0] if len(parts) == 1 else concat_pairs(parts, torch.float64)  # one part: no copy
    d_out, d_in = pair.b.shape[0], pair.a.shape[1]
    if not policy.lossy and min(pair.a.shape[0], d_out, d_in) * (d_out + d_in) >= d_out * d_in:
        # Even the largest rank the factors could have makes them no smaller: skip the SVD.
        return _dense(module_delta(pair, pair.a.dtype), policy)
    canon = canonical_pair(pair, out_dtype=torch.float64)
    s = singular_values(canon)
    k = kept_rank(s, policy)
    if k * (d_out + d_in) >= d_out * d_in:
        return _dense(canon.b @ canon.a, policy)
    sent = LoraPair(canon.a[:k].to(policy.dtype), canon.b[:, :k].to(policy.dtype))
    energy = float(s.square().sum())
    left = _factor_remainder(canon, sent, k, policy)
    report = ModuleReport("factors", k, sent.a.numel() + sent.b.numel(), energy, 0.0 if left is None else module_energy(left))
    return sent, left, report


def _on(part: ModuleUpdate, device: torch.device) -> ModuleUpdate:
    """A remainder read from disk, moved to where the round's stack is (e.g. the merge GPU)."""
    return LoraPair(part.a.to(device), part.b.to(device)) if is_factors(part) else part.to(device)


def kept_rank(s: Tensor, policy: DownlinkPolicy) -> int:
    """The smallest k whose leading singular values keep ``policy.energy``, capped by max_rank."""
    k = s.numel()
    if policy.energy < 1.0:
        cumulative = torch.cumsum(s.square(), 0)
        k = int((cumulative < policy.energy * cumulative[-1]).sum()) + 1
    if policy.max_rank is not None:
        k = min(k, policy.max_rank)
    return max(1, min(k, s.numel()))


def _factor_remainder(canon: LoraPair, sent: LoraPair, k: int, policy: DownlinkPolicy) -> LoraPair | None:
    """What the factors sent leave out: the tail directions and, in half precision, the rounding.

    b a - fl(b) fl(a) = (b - fl(b)) a + fl(b) (a - fl(a)) holds exactly, so the rounding is itself
    two factor pairs; the whole remainder is re-factored canonically to keep its rank bounded.
    """
    pieces = []
    if k < canon.a.shape[0]:
        pieces.append(LoraPair(canon.a[k:], canon.b[:, k:]))
    if policy.dtype != torch.float32:
        a, b = canon.a[:k], canon.b[:, :k]
        a_sent, b_sent = sent.a.double(), sent.b.double()
        pieces += [LoraPair(a, b - b_sent), LoraPair(a - a_sent, b_sent)]
    if not pieces:
        return None
    return canonical_pair(concat_pairs(pieces, torch.float64))


def _dense(delta: Tensor, policy: DownlinkPolicy) -> tuple[Tensor, Tensor | None, ModuleReport]:
    """Send the dense delta in the wire dtype; carry its rounding when that is coarser than float32."""
    sent = delta.to(policy.dtype)
    left = (delta.double() - sent.double()).float() if policy.dtype != torch.float32 else None
    energy = module_energy(delta)
    report = ModuleReport("dense", None, sent.numel(), energy, 0.0 if left is None else module_energy(left))
    return sent, left, report

