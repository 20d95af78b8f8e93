"""FSDP: a data-parallel group that also splits the model over its processes (``--shard full``).

When the base does not fit one device, each worker holds 1/N of every parameter (torch's FSDP2
``fully_shard``: one unit per transformer block, one for the rest of the model); a block's full
weights exist only while it runs, all-gathered for its forward and again for its backward. The
frozen base and the LoRA factors are both sharded. Only the factors have gradients, and FSDP
reduce-scatters them summed rather than averaged, so the group's LoRA equals one process's over
the same global batch (``client.data_parallel`` says why sums). Each rank runs its rows of every
micro-batch; a rank with none still runs the forward and backward (FSDP's collectives need
every rank), on a row that counts nothing (``trainer._optimizer_step``).

``--shard auto`` shards when the base's bytes exceed the free memory of one of the group's CUDA
devices, and never on CPU (the processes share the host's memory, and a base too large for it
would not have loaded).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from flora.client.data_parallel import GroupReplicas
from flora.common.devices import free_memory, model_bytes


def shards_model(mode: str, base_bytes: int, free_bytes: int | None) -> bool:
    """Whether a worker wants the model sharded: ``full`` yes, ``auto`` when the base does not fit
    its device's ``free_bytes`` (None: a CPU, never), anything else no."""
    if mode == "auto":
        return free_bytes is not None and base_bytes > free_bytes
    return mode == "full"


def group_shards(mode: str, model: nn.Module, device: torch.device) -> bool:
    """The group's one answer: shard when any worker wants it (every rank must call this)."""
    wanted = torch.tensor([int(shards_model(mode, model_bytes(model), free_memory(device)))], device=device)
    dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
    return bool(wanted.item())


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (its transformer layers), the units FSDP gathers one at a time."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


class ShardedReplicas(GroupReplicas):
    """Rank ``rank`` of a group holding the model in shards (FSDP2), rows split as in ``GroupReplicas``."""

    shards = True

    def shard(self, model: nn.Module, device: torch.device) -> None:
        """Shard every block, then the rest; each rank's shards move to ``device``."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
        mesh = init_device_mesh(device.type, (self.world,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum over the group, as the single process's gradient
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)

    def reduce(self, params: list[nn.Parameter], step_loss: torch.Tensor) -> None:
        """The gradients were reduce-scattered (summed) in each backward; only the loss is left."""
        dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)

    def whole(self, tensor: torch.Tensor) -> torch.Tensor:
        """A sharded parameter all-gathered (every rank must ask, in the same order)."""
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
