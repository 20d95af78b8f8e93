"""Causal-LM loss over labelled tokens: the one definition training and evaluation share.

The mean is token-weighted (total cross-entropy over every labelled token / their number), so a
data set's loss does not depend on how it was cut into batches, and validation losses reported
by clients with different batch sizes compare directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.common.data import IGNORE_INDEX, TokenizedExample, collate


def shifted_targets(labels: Tensor) -> Tensor:
    """Position t predicts token t+1: labels shifted left, the last position ignored. (B, T)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def summed_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of cross-entropy over targets that are not IGNORE_INDEX, in float32.

    ``logits`` (B, T, V) and ``targets`` (B, T) from :func:`shifted_targets`. Computed in float32
    because half-precision logits lose the small probabilities cross-entropy depends on.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA when asked for; a no-op on CPU, where autocast would only slow down."""
    if device.type == "cuda" and dtype is not None:
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    data: Sequence[TokenizedExample],
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Token-weighted mean cross-entropy of ``model`` on ``data``, in eval mode.

    Examples are batched longest-first to waste little compute on padding (the result does not
    depend on the batching). The model's train/eval mode is restored afterwards. ``device``
    defaults to where the model's parameters are.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ordered = sorted(data, key=len, reverse=True)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(ordered), batch_size):
            batch = collate(ordered[start : start + batch_size])
            targets = shifted_targets(batch["labels"])
            count += int((targets != IGNORE_INDEX).sum())
            with autocast_context(device, autocast_dtype):
                # Right padding under a causal mask: real tokens never see the padding after them,
                # so no attention mask is needed (and SDPA keeps its fast causal path).
                logits = model(input_ids=batch["input_ids"].to(device), use_cache=False).logits
            total += summed_token_loss(logits, targets.to(device))
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no labelled tokens to evaluate (every example is empty or fully masked)")
    return float(total / count)
