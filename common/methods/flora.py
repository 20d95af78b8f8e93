"""``flora``: FLoRA stacking (Wang et al., NeurIPS 2024), exact for any mix of ranks.

- client start: a fresh LoRA of its own rank (A random, B zero) on the global model;
- server merges: the stack of the clients' LoRAs, sum_k p_k s_k B_k A_k exactly;
- kept: nothing; sent: the stacked (or canonical) delta.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.common.lora import LoraAdapter
from flora.common.methods.base import AggregationMethod, ClientStart, RoundResult, clipped_stack


class Flora(AggregationMethod):
    name = "flora"
    exact = True
    partial_modules = True  # a module left out is a zero update, which the stack keeps exactly
    summary = "FLoRA stacking: fresh LoRA per client and round, stacked and merged (exact)"
    dp_refusal = None  # the round's change is a sum of the clients' changes: the private release gives it

    def start(self, kept: LoraAdapter | None, rank: int, scaling: float) -> ClientStart:
        """A fresh LoRA: the model already holds every earlier round."""
        return ClientStart(init=None, removed=None)

    def merge(
        self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], weights: Sequence[float],
        dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
    ) -> RoundResult:
        """Stack along the rank axis: B_g A_g = sum_k p_k c_k s_k B_k A_k (a fresh start: the change is the LoRA)."""
        return RoundResult(delta=clipped_stack(updates, weights, [None] * len(updates), dtype, clips), kept=None)

    def released(
        self, kept: LoraAdapter | None, clients: Sequence[tuple[int, float]], weights: Sequence[float], change: LoraAdapter,
    ) -> RoundResult:
        """The released change is the round's delta; nothing is kept."""
        return RoundResult(delta=change, kept=None)
