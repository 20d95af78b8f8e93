"""``ffa``: FFA-LoRA (Sun et al., arXiv 2403.12313): A frozen at a shared seed, only B trained.

With one A for everybody the average of the products is the product of the averages, so
averaging B is exact, and the uplink carries B alone (half the factors). Mixed ranks use nested
leading rows of the one shared A (rank r_max): client k trains B_k against A[:r_k].

- client start: the leading r_k part of the global LoRA (A frozen), on the global model minus
  exactly that part;
- server merges: the exact change; the global LoRA becomes (A, sum_k p_k pad(B_k));
- kept: that LoRA; sent: its B (A never changes) and the delta. One scaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import math

import torch

from flora.common.aggregation import check_compatible
from flora.common.lora import LoraAdapter, LoraPair, pad_pair
from flora.common.methods.base import ClientStart, PersistentLora, RoundResult, exact_change, leading, toward


class Ffa(PersistentLora):
    name = "ffa"
    exact = True
    trains_a = False
    summary = "FFA-LoRA: A frozen at a shared seed, only B trained and averaged (exact, half the uplink)"
    dp_refusal = None  # the round's change is a sum of the clients' changes: the private release gives it

    def start(self, kept: LoraAdapter | None, rank: int, scaling: float) -> ClientStart:
        """The nested prefix of the global LoRA, A frozen, removed from the weights it trains on."""
        init = leading(kept, rank)
        return ClientStart(init=init, removed=init, train_a=False)

    def merge(
        self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], weights: Sequence[float],
        dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
    ) -> RoundResult:
        """Average the B's against the shared A; a client's own A is never read (it is not uploaded).

        A clip factor c_k moves B_k toward its start, B_init + c_k (B_k - B_init): with A shared,
        exactly c_k times the client's change.
        """
        check_compatible(updates, weights)
        for k, update in enumerate(updates):
            if not math.isclose(update.scaling, kept.scaling, rel_tol=1e-6):
                raise ValueError(f"ffa: update {k} has scaling {update.scaling:g}, the run's is {kept.scaling:g}")
        removed = self.removals(kept, updates)  # = each client's init: the leading part of kept
        wire = [  # what the server has: the shared A's leading rows and the uploaded B, clipped
            toward(start, LoraAdapter({n: LoraPair(kept.pairs[n].a[: u.rank], u.pairs[n].b) for n in u.pairs}, kept.scaling), c)
            for u, start, c in zip(updates, removed, clips or [1.0] * len(updates))
        ]
        pairs = {}
        for name, (a, _) in kept.pairs.items():
            b = sum(p * pad_pair(LoraPair(w.pairs[name].a, w.pairs[name].b.to(dtype)), kept.rank).b for p, w in zip(weights, wire))
            pairs[name] = LoraPair(a.to(dtype), b)
        return RoundResult(delta=exact_change(wire, weights, removed, dtype), kept=LoraAdapter(pairs, kept.scaling))

    def released(
        self, kept: LoraAdapter | None, clients: Sequence[tuple[int, float]], weights: Sequence[float], change: LoraAdapter,
    ) -> RoundResult:
        """``change`` holds the shared A and the released B sum, sum_k p_k c_k pad(B_k - B_init): the
        delta is that; the next global LoRA's B is the public sum_k p_k pad(B_init,k) plus it."""
        pairs = {}
        for name, (a, b) in change.pairs.items():
            start = sum(p * pad_pair(leading(kept, rank).pairs[name], kept.rank).b.to(b.dtype) for p, (rank, _) in zip(weights, clients))
            pairs[name] = LoraPair(a, start + b)
        return RoundResult(delta=change, kept=LoraAdapter(pairs, kept.scaling))
