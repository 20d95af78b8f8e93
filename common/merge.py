"""Merging a LoRA adapter into base weights: W <- W + s B A, computed in float32, cast back.

The arithmetic is a pure function over {module name: weight} so that the server, the clients
and offline tools all merge the same way, with or without a model object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from flora.common.lora import LoraAdapter
from flora.common.update import GlobalUpdate, is_factors, module_shape


def merged_weights(
    weights: Mapping[str, Tensor], adapter: LoraAdapter, precision: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """New weights W + s B A for every module of ``adapter``, in each weight's dtype and device.

    The product is formed in ``precision`` (half-precision products lose the small updates LoRA
    makes) and nothing is returned unless every result is finite, so that a bad adapter can never
    leave a model half-merged.
    """
    merged = {}
    for name in adapter.module_names:
        weight = _weight(weights, name)
        a, b = (t.to(device=weight.device, dtype=precision) for t in adapter.pairs[name])
        _check_shape(name, (b.shape[0], a.shape[1]), weight)
        merged[name] = _finite(name, torch.addmm(weight.to(precision), b, a, alpha=adapter.scaling), weight.dtype)
    return merged


def merged_update(
    weights: Mapping[str, Tensor], update: GlobalUpdate, precision: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """New weights W + b a (factors) or W + D (dense) for every module of a downlink ``update``.

    The same rules as ``merged_weights``: arithmetic in ``precision``, all modules or none.
    """
    merged = {}
    for name in sorted(update):
        weight, part = _weight(weights, name), update[name]
        _check_shape(name, module_shape(part), weight)
        if is_factors(part):
            a, b = (t.to(device=weight.device, dtype=precision) for t in part)
            new = torch.addmm(weight.to(precision), b, a)
        else:
            new = weight.to(precision) + part.to(device=weight.device, dtype=precision)
        merged[name] = _finite(name, new, weight.dtype)
    return merged


def _weight(weights: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in weights:
        raise KeyError(f"module {name!r} of the adapter is not among the weights being merged")
    return weights[name]


def _check_shape(name: str, delta_shape: tuple[int, int], weight: Tensor) -> None:
    if tuple(delta_shape) != tuple(weight.shape):
        raise ValueError(f"module {name!r}: adapter delta is {tuple(delta_shape)} but the weight is {tuple(weight.shape)}")


def _finite(name: str, new: Tensor, dtype: torch.dtype) -> Tensor:
    if not torch.isfinite(new).all():
        raise ValueError(f"module {name!r}: merging the adapter gives non-finite weights")
    return new.to(dtype)


def module_weights(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The live weight tensors of the named linear modules of ``model``."""
    return {name: model.get_submodule(name).weight for name in names}


def merge_into_model(model: nn.Module, adapter: LoraAdapter, precision: torch.dtype = torch.float32) -> None:
    """Add ``adapter`` to the model's weights in place (all modules, or none on error)."""
    live = module_weights(model, adapter.module_names)
    updated = merged_weights(live, adapter, precision)
    with torch.no_grad():
        for name, new in updated.items():
            live[name].copy_(new)


def merge_into_state_dict(
    state_dict: Mapping[str, Tensor], adapter: LoraAdapter, precision: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """A copy of a Hugging Face state dict (keys "<module>.weight") with ``adapter`` merged in."""
    weights = {name: state_dict[f"{name}.weight"] for name in adapter.module_names if f"{name}.weight" in state_dict}
    merged = merged_weights(weights, adapter, precision)
    out = dict(state_dict)
    out.update({f"{name}.weight": w for name, w in merged.items()})
    return out


@contextlib.contextmanager
def merged_temporarily(model: nn.Module, adapter: LoraAdapter, precision: torch.dtype = torch.float32) -> Iterator[None]:
    """``model`` with ``adapter`` merged in for the block, its exact original weights afterwards.

    How a client trains its round on the global model minus what its method removes
    (``flora.client.round_start``) without its copy of the global model ever drifting.
    """
    live = module_weights(model, adapter.module_names)
    saved = {name: weight.detach().clone() for name, weight in live.items()}
    merge_into_model(model, adapter, precision)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in live.items():
                weight.copy_(saved[name])
