"""One training process's place in a data-parallel group: its rows, and the sum over the group.

This is the ``Replicas`` (``client.replicas``) that ``trainer.train_lora`` takes, backed by ``torch.distributed``
(gloo on CPU, NCCL on CUDA). It does what DDP does for LoRA, without wrapping the model: only the
LoRA factors have gradients, so one flat all-reduce per optimiser step (after the step's
micro-batches) carries them all, and summing rather than DDP's averaging keeps the gradient the
single-process one exactly (each row's loss is divided by the whole step's label count already).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flora.client.replicas import Replicas


def shard_rows(count: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous block of ``count`` rows; the first ``count % world`` get one more."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class GroupReplicas(Replicas):
    """This process as rank ``rank`` of the initialised default process group, holding the model whole."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def rows(self, count: int) -> slice:
        return shard_rows(count, self.rank, self.world)

    def reduce(self, params: list[nn.Parameter], step_loss: torch.Tensor) -> None:
        """All-reduce (sum) every parameter's gradient and the step's loss in one flat buffer.

        A process that had no rows this step has no gradients yet: it contributes zeros.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [step_loss.reshape(1).float()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
            offset += grad.numel()
        step_loss.copy_(flat[offset])
