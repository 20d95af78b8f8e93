"""``zeropad``: HetLoRA-style zero-padding, the mixed-rank baseline (inexact).

- client start: the leading r_k rows of A and columns of B of the global LoRA (rank r_max), on
  the base weights (so a low-rank client does not see the global LoRA's tail);
- server merges: every client padded to r_max, A and B averaged, replacing the global LoRA;
- kept: the padded average; sent: it. One scaling for every client.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.common.aggregation import zeropad_average
from flora.common.lora import LoraAdapter, pad_rank
from flora.common.methods.base import ClientStart, PersistentLora, RoundResult, clipped_factors, difference, leading


class ZeroPad(PersistentLora):
    name = "zeropad"
    exact = False
    summary = "zero-padding (HetLoRA-style): persistent LoRA of the largest rank, clients take its leading part (inexact)"
    dp_refusal = (
        "its global LoRA is the average of the clients' padded A and of their B, which clipping the change of"
        " each product does not bound: those averages would need private releases of their own"
    )

    def start(self, kept: LoraAdapter | None, rank: int, scaling: float) -> ClientStart:
        """The nested prefix of the global LoRA, on the weights without any of it."""
        return ClientStart(init=leading(kept, rank), removed=kept)

    def merge(
        self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], weights: Sequence[float],
        dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
    ) -> RoundResult:
        """Pad, average (clipped factors moved toward their start), and keep the result at the global rank."""
        new = pad_rank(zeropad_average(clipped_factors(updates, self.inits(kept, updates), clips), weights, dtype), kept.rank)
        return RoundResult(delta=difference(new, kept, dtype), kept=new)
