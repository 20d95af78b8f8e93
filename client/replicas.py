"""The group a training process belongs to, as ``trainer.train_lora`` sees it.

``Replicas`` itself is a process training by itself (``ALONE``): all rows are its own, there is
nothing to sum, and the model trains whole on one device. A data-parallel group
(``client.data_parallel.GroupReplicas``) trains its rows of each micro-batch and sums the
gradients; a sharded one (``client.sharding.ShardedReplicas``, FSDP) also splits the model
itself over the group. The training loop asks these few questions and never branches on which
kind it has.
"""

from __future__ import annotations

import torch
from torch import nn


class Replicas:
    """A process training by itself.

    Every process of a group draws the same micro-batches (same seed) and runs its own rows of
    each; summing the gradients over the group then gives exactly the gradient of one process
    running all the rows, because each row's loss is already divided by the whole step's label
    count. So a group's LoRA equals a single process's over the same global batch, to round-off.
    """

    shards = False  # whether the group holds the model in shards (FSDP) rather than whole

    def rows(self, count: int) -> slice:
        """This process's rows of a micro-batch of ``count`` rows (possibly none)."""
        return slice(0, count)

    def shard(self, model: nn.Module, device: torch.device) -> None:
        """Place ``model`` (LoRA attached and initialised) for training when ``shards``; else nothing."""

    def reduce(self, params: list[nn.Parameter], step_loss: torch.Tensor) -> None:
        """Sum the step's gradients and loss over the group, in place, before the optimiser step."""

    def whole(self, tensor: torch.Tensor) -> torch.Tensor:
        """The full value of a (possibly sharded) parameter, for reading the trained factors out."""
        return tensor


ALONE = Replicas()
