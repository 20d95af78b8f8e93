"""``flexlora``: FlexLoRA (Bai et al., arXiv 2402.11505), a mixed-rank baseline (inexact).

- client start: the best rank-r_k approximation of the global update (truncated SVD), on the
  base weights (the global model minus the whole global update), fresh in round 1;
- server merges: the global update replaced by the average of the products,
  sum_k p_k s_k B_k A_k (kept as its stack), which is exact: what makes the method inexact is
  the start, where a client's model is the base plus a truncation of the global update;
- kept: that average as canonical factors (the stack itself would hand out every client's
  factors); sent: them and the delta.

Under client-level DP that average is rebuilt from the private release of the clipped changes:
every start init_k is public (the kept LoRA's top-r_k part), so sum_k p_k init_k + the released
sum_k p_k c_k (s_k B_k A_k - init_k) is the clipped average ``merge`` forms, plus the noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.common.lora import LoraAdapter
from flora.common.methods.base import (
    AggregationMethod, ClientStart, RoundResult, canonical_adapter, clipped_stack, difference, plus_starts, principal,
)


class FlexLora(AggregationMethod):
    name = "flexlora"
    exact = False
    summary = "FlexLoRA: average of products, clients start from its truncated SVD on the base (inexact)"
    dp_refusal = None  # the average of the products is the public starts plus the sum of the clients' changes

    def start(self, kept: LoraAdapter | None, rank: int, scaling: float) -> ClientStart:
        """The global update cut to this client's rank, on the weights without any of it."""
        if kept is None:
            return ClientStart(init=None, removed=None)
        return ClientStart(init=principal(kept, rank, scaling), removed=kept)

    def merge(
        self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], weights: Sequence[float],
        dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
    ) -> RoundResult:
        """Replace the global update by the average of the clients' (clipped) products."""
        clipped = clips is not None and any(c != 1.0 for c in clips)  # only then the starts matter: an SVD each
        inits = self.inits(kept, updates) if clipped else [None] * len(updates)
        new = canonical_adapter(clipped_stack(updates, weights, inits, dtype, clips))
        return RoundResult(delta=difference(new, kept, dtype), kept=new)

    def released(
        self, kept: LoraAdapter | None, clients: Sequence[tuple[int, float]], weights: Sequence[float], change: LoraAdapter,
    ) -> RoundResult:
        """The global update becomes the public starts plus the released change, sum_k p_k init_k +
        change (``merge``'s average of the clipped products, from the release), canonical as there."""
        inits = [self.cached_start(kept, rank, scaling).init for rank, scaling in clients]
        new = canonical_adapter(plus_starts(change, inits, weights))
        return RoundResult(delta=difference(new, kept, torch.float64), kept=new)
