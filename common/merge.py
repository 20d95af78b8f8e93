"""Merging a LoRA adapter into base weights: W <- W + s B A, computed in float32, cast back.

The arithmetic is a pure function over {module name: weight} so that the server, the clients
and offline tools all merge the same way, with or without a model object. Every weight here is
(out, in); a layer that stores its weight transposed (GPT-2's Conv1D) is handed in as a
transposed view (``module_weights``), so W + s B A lands in it as (W^T + s B A)^T.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping

import torch
from torch import Tensor, nn

from flora.common.architectures import logical_weight
from flora.common.lora import LoraAdapter
from flora.common.update import GlobalUpdate, ModuleUpdate, is_factors, module_shape


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
        weight, pair = _weight(weights, name), adapter.pairs[name]
        _check_shape(name, module_shape(pair), weight)
        merged[name] = _finite(name, _merged_part(weight, pair, precision, adapter.scaling), weight.dtype)
    return merged


def merged_update(
    weights: Mapping[str, Tensor], update: GlobalUpdate, precision: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """New weights W + b a (factors) or W + D (dense) for every module of a downlink ``update``.

    The same rules as ``merged_weights``: arithmetic in ``precision``, all modules or none.
    """
    _check_update_shapes(weights, update)
    return {name: _finite(name, _merged_part(weights[name], update[name], precision), weights[name].dtype)
            for name in sorted(update)}


def merge_update_in_place(
    weights: Mapping[str, Tensor], update: GlobalUpdate, precision: torch.dtype = torch.float32
) -> None:
    """Add a downlink ``update`` to ``weights`` in place: the values ``merged_update`` gives, all
    modules or none, but with one module's working copy at a time rather than every merged module
    at once (the server's merge of a 1B shape held its q/v twice, 0.34 GiB more in float32).

    All or none without holding the results: every module's result is first proved finite from
    bounds (``_proved_finite``); only where a bound cannot prove it does the merge fall back to
    ``merged_update``, which computes everything before anything changes.
    """
    _check_update_shapes(weights, update)
    proved = all(_proved_finite(weights[name], update[name], precision) for name in update)
    merged = None if proved else merged_update(weights, update, precision)  # raises before any change
    with torch.no_grad():
        for name in sorted(update):
            weights[name].copy_(_merged_part(weights[name], update[name], precision) if merged is None else merged[name])


def _merged_part(weight: Tensor, part: ModuleUpdate, precision: torch.dtype, scaling: float = 1.0) -> Tensor:
    """W + s b a or W + D in ``precision``, on the weight's device (not yet checked or cast back)."""
    if is_factors(part):
        a, b = (t.to(device=weight.device, dtype=precision) for t in part)
        return torch.addmm(weight.to(precision), b, a, alpha=scaling)
    return weight.to(precision) + part.to(device=weight.device, dtype=precision)


def _proved_finite(weight: Tensor, part: ModuleUpdate, precision: torch.dtype) -> bool:
    """Whether W + b a (or W + D) is certainly finite in ``precision`` and in the weight's dtype.

    |(b a)_ij| <= |b_i| |a_j| (Cauchy-Schwarz over rows of b and columns of a), so every entry is
    at most max|W| + max_i |b_i| max_j |a_j|. Half the smaller of the two dtypes' largest values
    leaves the rounding of the sums far inside the proof. False (not proved) is not a refusal.
    """
    limit = min(torch.finfo(weight.dtype).max, torch.finfo(precision).max) / 2
    if is_factors(part):
        a, b = (t.detach().to(torch.float64) for t in part)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return False
        bound = float(b.norm(dim=1).max() * a.norm(dim=0).max()) if a.numel() and b.numel() else 0.0
    else:
        bound = _largest_magnitude(part)
    return _largest_magnitude(weight) + bound < limit  # False for a NaN or infinite entry


def _largest_magnitude(tensor: Tensor) -> float:
    """max |x| over the tensor without a copy of it (NaN if it holds one, 0 if it is empty)."""
    if not tensor.numel():
        return 0.0
    low, high = torch.aminmax(tensor.detach())
    return float(torch.maximum(-low, high))  # NaN wherever either is


def _check_update_shapes(weights: Mapping[str, Tensor], update: GlobalUpdate) -> None:
    for name in sorted(update):
        _check_shape(name, module_shape(update[name]), _weight(weights, name))


def _weight(weights: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in weights:
        raise KeyError(f"module {name!r} of the adapter is not among the weights being merged")
    return weights[name]


def _check_shape(name: str, delta_shape: tuple[int, int], weight: Tensor) -> None:
    if tuple(delta_shape) != tuple(weight.shape):
        raise ValueError(f"module {name!r}: adapter delta is {tuple(delta_shape)} but the weight is {tuple(weight.shape)}")


def _finite(name: str, new: Tensor, dtype: torch.dtype) -> Tensor:
    """``new`` cast to ``dtype``, checked after the cast: a float32 result can overflow float16."""
    out = new.to(dtype)
    if not torch.isfinite(out).all():
        raise ValueError(f"module {name!r}: merging the adapter gives non-finite weights")
    return out


def module_weights(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The live weights of the named layers of ``model``, each (out, in) and sharing its storage:
    what is copied into them is in the model (``architectures.logical_weight``)."""
    return {name: logical_weight(model.get_submodule(name)) for name in names}


def merge_into_model(model: nn.Module, adapter: LoraAdapter, precision: torch.dtype = torch.float32) -> None:
    """Add ``adapter`` to the model's weights in place (all modules, or none on error)."""
    live = module_weights(model, adapter.module_names)
    updated = merged_weights(live, adapter, precision)
    with torch.no_grad():
        for name, new in updated.items():
            live[name].copy_(new)


def merge_into_state_dict(
    state_dict: Mapping[str, Tensor], adapter: LoraAdapter, precision: torch.dtype = torch.float32,
    transposed: Collection[str] = (),
) -> dict[str, Tensor]:
    """A copy of a Hugging Face state dict (keys "<module>.weight") with ``adapter`` merged in.

    ``transposed`` names the modules whose stored weight is (in, out) (Conv1D, ``fan_in_fan_out``).
    """
    def oriented(name: str, weight: Tensor) -> Tensor:
        return weight.T if name in transposed else weight

    weights = {name: oriented(name, state_dict[f"{name}.weight"]) for name in adapter.module_names if f"{name}.weight" in state_dict}
    merged = merged_weights(weights, adapter, precision)
    out = dict(state_dict)
    out.update({f"{name}.weight": oriented(name, w).contiguous() for name, w in merged.items()})
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
