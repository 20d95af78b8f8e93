"""``fedex``: FedEx-LoRA (Singhal et al., arXiv 2410.09432): FedIT's warm start, made exact.

- client start: the leading r_k part of the persistent global LoRA, on the global model minus
  exactly that part (so its model at step 0 is the global model, whatever its rank);
- server merges: the exact FedAvg of the clients' models; the global LoRA becomes the (padded)
  average of A and of B, and the residual sum_k p_k s_k B_k A_k - s B_avg A_avg (plus, with
  mixed ranks, the tail no client trained) is folded into the base weights;
- kept: the averaged LoRA; sent: it and the residual (the delta carries both). One scaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.common.aggregation import zeropad_average
from flora.common.lora import LoraAdapter, pad_rank
from flora.common.methods.base import ClientStart, PersistentLora, RoundResult, clipped_factors, exact_change, leading


class FedEx(PersistentLora):
    name = "fedex"
    exact = True
    summary = "FedEx-LoRA: persistent averaged LoRA plus the exact residual folded into the base (exact)"
    dp_refusal = (
        "it keeps the average of the clients' A and of their B beside the exact residual, and clipping the "
        "change of each product does not bound those averages: they would need private releases of their own"
    )

    def start(self, kept: LoraAdapter | None, rank: int, scaling: float) -> ClientStart:
        """The nested prefix of the global LoRA, removed from the weights it is trained on."""
        init = leading(kept, rank)
        return ClientStart(init=init, removed=init)

    def merge(
        self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], weights: Sequence[float],
        dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
    ) -> RoundResult:
        """Merge the exact change; keep the average of the (clipped) factors as the next warm start."""
        removed = self.removals(kept, updates)  # = each client's init
        new = pad_rank(zeropad_average(clipped_factors(updates, removed, clips), weights, dtype), kept.rank)
        return RoundResult(delta=exact_change(updates, weights, removed, dtype, clips), kept=new)
