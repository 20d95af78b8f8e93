"""``flexlora``: FlexLoRA (Bai et al., arXiv 2402.11505), a mixed-rank baseline (inexact).

- client start: the best rank-r_k approximation of the global update (truncated SVD), on the
  base weights (the global model minus the whole global update), fresh in round 1;
- server merges: the global update replaced by the average of the products,
  sum_k p_k s_k B_k A_k (kept as its stack), which is exact: what makes the method inexact is
  the start, where a client's model is the base plus a truncation of the global update;
- kept: that average as canonical factors (the stack itself would hand out every client's
  factors); sent: them and the delta.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.common.lora import LoraAdapter
from flora.common.methods.base import (
    AggregationMethod, ClientStart, RoundResult, canonical_adapter, clipped_stack, difference, principal,
)


class FlexLora(AggregationMethod):
    name = "flexlora"
    exact = False
    summary = "FlexLoRA: average of products, clients start from its truncated SVD on the base (inexact)"
    dp_refusal = (
        "its global update is the average of the clients' whole products, each from its own truncated start, "
        "not a sum of changes from one public start: the private releases (sum of clipped changes) do not "
        "give it"
    )

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
