"""``fedit``: FedIT (Zhang et al., 2023), a correct baseline: one persistent LoRA, A and B averaged.

- client start: the global LoRA itself, on the base weights (the global model minus that LoRA);
- server merges: the global LoRA replaced by (sum p_k A_k, sum p_k B_k); equal ranks and
  scalings required; inexact by the cross terms of the product of averages;
- kept: the averaged LoRA; sent: it (the clients replace theirs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.common.aggregation import fedit_average
from flora.common.lora import LoraAdapter
from flora.common.methods.base import ClientStart, PersistentLora, RoundResult, clipped_factors, difference


class FedIt(PersistentLora):
    name = "fedit"
    exact = False
    summary = "FedIT: persistent global LoRA, A and B averaged separately (equal ranks; inexact)"
    dp_refusal = (
        "its global LoRA is the average of the clients' A and of their B, which clipping the change of each "
        "product does not bound: those averages would need private releases of their own"
    )

    def admits(self, rank: int, scaling: float, global_rank: int, required_scaling: float) -> str | None:
        """Averaging factors of different shapes is undefined; zeropad is the mixed-rank variant."""
        if rank != global_rank:
            return f"averages A and B separately, so every client needs the same rank: rank {rank} is not the global LoRA rank {global_rank}"
        return super().admits(rank, scaling, global_rank, required_scaling)

    def start(self, kept: LoraAdapter | None, rank: int, scaling: float) -> ClientStart:
        """Train the global LoRA further, on the weights it sits on."""
        return ClientStart(init=kept, removed=kept)

    def merge(
        self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], weights: Sequence[float],
        dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
    ) -> RoundResult:
        """Replace the global LoRA by the averages of A and of B (clipped factors moved toward the start)."""
        new = fedit_average(clipped_factors(updates, self.inits(kept, updates), clips), weights, dtype)
        return RoundResult(delta=difference(new, kept, dtype), kept=new)
