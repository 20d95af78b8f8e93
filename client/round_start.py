"""Starting a round as the method says: remove what it names from the model, train from its init.

Shared by the client daemon and ``flora-sim`` so that a simulated client starts its round exactly
as a deployed one does. The model is left exactly as it was (``LocalWeights.temporarily`` restores
it bit for bit), so one copy of the global model serves every round, full precision or quantized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from torch import nn

from flora.client.local_weights import LocalWeights, as_local
from flora.client.trainer import TrainConfig, TrainResult, train_lora
from flora.common.data import TokenizedExample
from flora.common.methods import ClientStart, negated


def train_round(
    model: nn.Module | LocalWeights, data: Sequence[TokenizedExample], config: TrainConfig, start: ClientStart,
    **kwargs: Any,
) -> TrainResult:
    """One round of local training on ``model`` (the global model) from the method's ``start``.

    The round's base weights are the global model minus ``start.removed``; the LoRA starts from
    ``start.init`` (fresh when None) and trains A only when ``start.train_a``. ``kwargs`` go to
    ``train_lora`` (validation data, progress and cancellation callbacks).
    """
    local = as_local(model)
    removal = local.temporarily(negated(start.removed)) if start.removed is not None else contextlib.nullcontext()
    with removal:
        return train_lora(local.model, data, config, init=start.init, train_a=start.train_a, **kwargs)
