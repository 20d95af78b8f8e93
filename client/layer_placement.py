"""``--shard layers``: one training process, the model's layers spread over several devices.

For a base larger than one device when data-parallel training is not wanted: accelerate's
``infer_auto_device_map`` gives whole blocks (never half a transformer layer) to the devices in
order, balanced over their free memory (``get_balanced_memory``), and ``dispatch_model`` places
them and hooks each block to move its inputs to its own device. The logits come back to the first
device, where the trainer puts the inputs and computes the loss; PEFT attaches each LoRA layer
beside its base layer, so the trainer moves nothing (``placed_across_devices``). Only one device
computes at a time: this buys memory, not speed.

accelerate numbers GPUs, so the map is computed over indexes 0..N-1 and index i then stands for
the i-th of ``--devices``; a ``cpu`` entry (a test, or a host without CUDA) budgets the host's
available memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import psutil
import torch
from torch import nn

from flora.common.devices import free_memory, model_bytes

log = logging.getLogger(__name__)


def placed_across_devices(model: nn.Module) -> bool:
    """Whether the model was placed by ``place_layers`` (and so must not be moved as a whole)."""
    return bool(getattr(model, "hf_device_map", None))


def device_budgets(devices: Sequence[str]) -> list[int]:
    """Free bytes of each device: a CUDA device's free memory, the host's available memory for ``cpu``."""
    free = [free_memory(torch.device(device)) for device in devices]
    return [psutil.virtual_memory().available if f is None else f for f in free]


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate warns that GPU index i is 'not available' when the indexes stand for CPU entries."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def layer_map(model: nn.Module, budgets: Sequence[int]) -> dict[str, int]:
    """Module name -> index of the device it goes to, balanced over ``budgets`` (bytes per device).

    A ValueError when the model's blocks do not all fit: nothing is offloaded to the CPU or disk.
    """
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = sorted(getattr(model, "_no_split_modules", None) or ())
    with _quiet_accelerate():
        balanced = get_balanced_memory(model, max_memory=dict(enumerate(budgets)), no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)
    left_over = [name for name, index in device_map.items() if not isinstance(index, int)]
    if left_over:
        raise ValueError(f"the base ({model_bytes(model)} bytes) does not fit the devices' free memory ({sum(budgets)} bytes "
                         f"together; {left_over[0]!r} and after left over): add devices or use --quantize")
    return dict(device_map)


def place_layers(model: nn.Module, devices: Sequence[str]) -> nn.Module:
    """Spread ``model`` (anywhere, usually on the CPU) over ``devices``; inputs and outputs on the first."""
    from accelerate import dispatch_model

    indexes = layer_map(model, device_budgets(devices))
    log.info("event=layers_placed devices=%s modules_per_device=%s", ",".join(devices),
             [sum(1 for index in indexes.values() if index == i) for i in range(len(devices))])
    # Hooks even when every entry is the same device, so the CPU tests run the path GPUs run.
    device_map = {name: devices[index] for name, index in indexes.items()}
    return dispatch_model(model, device_map=device_map, main_device=devices[0], force_hooks=True)
