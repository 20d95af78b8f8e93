"""``flora-warm``: FLoRA stacking with warm starts from the aggregate's principal directions.

FLoRA restarts every client at B = 0, so each round's first steps re-find a subspace. Here, as
PiSSA and FRLoRA initialise from principal directions, client k starts round t + 1 from the
top-r_k singular part of round t's stacked aggregate and trains on the global model minus that
part, so its model at step 0 is unchanged:

- client start: init = removed = best rank-r_k approximation of the kept aggregate
  (balanced factors, sqrt of the singular values on each side); round 1 is fresh, and so are
  the directions beyond the aggregate's rank (A random, B zero: they train, see ``principal``);
- server merges: the exact change sum_k p_k (s_k B_k A_k - init_k), stacked;
- kept: the round's aggregate sum_k p_k s_k B_k A_k as canonical factors cut to the largest
  client rank (all that any start reads; a client of a larger rank starts fresh directions beyond);
  sent: the delta and the kept factors. Exact for any mix of ranks and scalings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.common.lora import LoraAdapter
from flora.common.methods.base import (
    AggregationMethod, ClientStart, RoundResult, canonical_adapter, clipped_stack, exact_change, plus_starts, principal,
)


class FloraWarm(AggregationMethod):
    name = "flora-warm"
    exact = True
    summary = "warm-started stacking: clients start from the top-r_k directions of the last aggregate (exact)"
    dp_refusal = None  # the round's change is a sum of the clients' changes: the private release gives it

    def start(self, kept: LoraAdapter | None, rank: int, scaling: float) -> ClientStart:
        """The aggregate's top-r_k part, removed from the weights so that the model is unchanged."""
        if kept is None:
            return ClientStart(init=None, removed=None)
        init = principal(kept, rank, scaling)
        return ClientStart(init=init, removed=init)

    def merge(
        self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], weights: Sequence[float],
        dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
    ) -> RoundResult:
        """The exact change of the round; its clients' (clipped) stack is the next warm start."""
        removed = self.removals(kept, updates)  # = each client's init
        kept_next = canonical_adapter(clipped_stack(updates, weights, removed, dtype, clips), max(u.rank for u in updates))
        return RoundResult(delta=exact_change(updates, weights, removed, dtype, clips), kept=kept_next)

    def released(
        self, kept: LoraAdapter | None, clients: Sequence[tuple[int, float]], weights: Sequence[float], change: LoraAdapter,
    ) -> RoundResult:
        """The released change is the delta; the next warm start is the released change plus the
        public starts, sum_k p_k init_k + change (``merge``'s clipped stack, from the release)."""
        inits = [self.cached_start(kept, rank, scaling).init for rank, scaling in clients]
        kept_next = canonical_adapter(plus_starts(change, inits, weights), max(rank for rank, _ in clients))
        return RoundResult(delta=change, kept=kept_next)
