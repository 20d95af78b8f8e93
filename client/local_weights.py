"""The client's model at the global version it holds: one interface, two forms.

STYLE.md: the client's model is either the base with the global update merged into its weights
(``MergedWeights``, full precision) or a frozen quantized base with the cumulative global update
held beside it (``HeldUpdate``). Merging a small update into 4-bit weights would vanish in their
rounding, and re-quantizing every round would drift from the server, so a quantized client never
merges: it keeps the sum of every global update it applied, per module as canonical factors (or
a dense delta in the compute dtype once that is smaller), and adds it in each target module's
forward pass. Its model is then quantize(base) + the exact cumulative update, and what it trains
and uploads are ordinary LoRA factors; the server cannot tell the two forms apart.

Sync and training ask the interface (apply updates, take merged modules, remove an adapter for a
block, export and restore the persisted state) and never branch on quantization.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flora.common.lora import LoraAdapter, LoraPair
from flora.common.merge import merged_temporarily, merged_update, module_weights
from flora.common.quantize import Quantization, quantize_model
from flora.common.update import GlobalUpdate, ModuleUpdate, cumulative_factors, is_factors, module_delta, module_shape


class LocalWeights(ABC):
    """The model a client trains, at the global version it holds, and how that version moves."""

    form: ClassVar[str]  # the state directory's name for what ``export`` returns
    takes_merged: ClassVar[bool]  # whether the server's merged modules can replace the replay of updates

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model = model
        self.names = sorted(names)

    @abstractmethod
    def apply(self, updates: Iterable[GlobalUpdate]) -> None:
        """Add the downlink updates in order: all of them, or (on an error) none."""

    @abstractmethod
    def replace(self, weights: Mapping[str, Tensor]) -> None:
        """Take the server's merged modules as they are (catch-up without replay)."""

    @abstractmethod
    def temporarily(self, adapter: LoraAdapter) -> contextlib.AbstractContextManager[None]:
        """The model with ``adapter``'s update added for the block, exactly as before afterwards."""

    @abstractmethod
    def export(self) -> dict[str, ModuleUpdate]:
        """What the state directory persists (on CPU): enough to ``restore`` this version after a restart."""

    @abstractmethod
    def restore(self, saved: Mapping[str, ModuleUpdate]) -> None:
        """Return to the version ``export`` saved, on a freshly loaded base."""


class MergedWeights(LocalWeights):
    """Full-precision base: every global update merged into the target modules' weights (float32 arithmetic)."""

    form = "merged"
    takes_merged = True

    def apply(self, updates: Iterable[GlobalUpdate]) -> None:
        """Merge on a copy of the target weights, so the model moves as a whole or not at all."""
        weights = {name: w.detach().clone() for name, w in module_weights(self.model, self.names).items()}
        for update in updates:
            weights = merged_update(weights, update, precision=torch.float32)
        self.replace(weights)

    def replace(self, weights: Mapping[str, Tensor]) -> None:
        """Copy ``weights`` into the live modules."""
        live = module_weights(self.model, sorted(weights))
        with torch.no_grad():
            for name, tensor in weights.items():
                live[name].copy_(tensor)

    def temporarily(self, adapter: LoraAdapter) -> contextlib.AbstractContextManager[None]:
        """Merged for the block, the original weights restored bit for bit afterwards."""
        return merged_temporarily(self.model, adapter)

    def export(self) -> dict[str, ModuleUpdate]:
        """The target modules' merged weights."""
        return {name: w.detach().to("cpu") for name, w in module_weights(self.model, self.names).items()}

    def restore(self, saved: Mapping[str, ModuleUpdate]) -> None:
        """The saved merged weights, copied in."""
        self.replace(saved)


class HeldUpdate(LocalWeights):
    """Frozen quantized base plus the cumulative global update, added in the forward pass."""

    form = "held"
    takes_merged = False  # merged modules minus a quantized base is not the server's update

    def __init__(self, model: nn.Module, names: Iterable[str], dense_dtype: torch.dtype) -> None:
        super().__init__(model, names)
        self.dense_dtype = dense_dtype
        self.held: dict[str, ModuleUpdate] = {}
        self._extra: dict[str, list[LoraPair]] = {}  # what ``temporarily`` adds
        modules = dict(model.named_modules())
        self._hooks = [modules[name].register_forward_hook(self._hook(name)) for name in self.names]

    def _hook(self, name: str) -> Any:
        def add_update(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            parts = ([self.held[name]] if name in self.held else []) + self._extra.get(name, [])
            for part in parts:
                output = output + update_forward(part, inputs[0])
            return output
        return add_update

    def apply(self, updates: Iterable[GlobalUpdate]) -> None:
        """Fold the updates into a copy of the held sum, then swap it in (all or none)."""
        held = {name: _to(part, "cpu") for name, part in self.held.items()}
        for update in updates:
            unknown = sorted(set(update) - set(self.names))
            if unknown:
                raise KeyError(f"module {unknown[0]!r} of the update is not a target module of this model")
            for name, part in update.items():
                held[name] = folded(held.get(name), part, self.dense_dtype)
        self.restore(held)

    def replace(self, weights: Mapping[str, Tensor]) -> None:
        """Refused: a quantized client replays updates (it asks the server for them, never merged modules)."""
        raise ValueError("a quantized base cannot take merged weights; it replays the global updates")

    @contextlib.contextmanager
    def temporarily(self, adapter: LoraAdapter) -> Iterator[None]:
        """Each module's s b a added beside the held update for the block, and gone afterwards."""
        added = {name: LoraPair(pair.a * adapter.scaling, pair.b) for name, pair in adapter.pairs.items()}
        for name, pair in added.items():
            self._extra.setdefault(name, []).append(_to(pair, self._device(name)))
        try:
            yield
        finally:
            for name in added:
                self._extra[name].pop()

    def export(self) -> dict[str, ModuleUpdate]:
        """The held cumulative update, module by module."""
        return {name: _to(part, "cpu") for name, part in self.held.items()}

    def restore(self, saved: Mapping[str, ModuleUpdate]) -> None:
        """Hold ``saved`` (on each module's device) as the cumulative update."""
        self.held = {name: _to(part, self._device(name)) for name, part in saved.items()}

    def _device(self, name: str) -> torch.device:
        return self.model.get_submodule(name).weight.device


def update_forward(part: ModuleUpdate, x: Tensor) -> Tensor:
    """x (b a)^T or x D^T: a module's update applied to its input without forming b a.

    Computed in the input's dtype (autocast, when on, picks the product's), so a bf16 forward
    stays bf16; on CPU float32 the result is dequantized base + update to float round-off.
    """
    if is_factors(part):
        return F.linear(F.linear(x, part.a.to(x.device, x.dtype)), part.b.to(x.device, x.dtype))
    return F.linear(x, part.to(x.device, x.dtype))


def folded(held: ModuleUpdate | None, part: ModuleUpdate, dense_dtype: torch.dtype) -> ModuleUpdate:
    """held + part for one module: canonical factors of the sum, or the dense sum when smaller.

    Canonical factors (``cumulative_factors``) keep the sum exact at rank at most min(d_out, d_in);
    once their float32 values would outweigh a dense delta in ``dense_dtype``, or a part arrives
    dense (the server sends dense only when factors would be larger), the sum goes dense and stays
    so (each later update added in float32, then cast back).
    """
    if not is_factors(part) or (held is not None and not is_factors(held)):
        return (module_delta(held) + module_delta(part) if held is not None else module_delta(part)).to(dense_dtype)
    total = cumulative_factors({"m": p} for p in ([part] if held is None else [held, part]))["m"]
    d_out, d_in = module_shape(part)
    factor_bytes = (total.a.numel() + total.b.numel()) * total.a.element_size()
    if factor_bytes > d_out * d_in * torch.empty((), dtype=dense_dtype).element_size():
        return module_delta(total).to(dense_dtype)
    return total


def _to(part: ModuleUpdate, device: torch.device | str) -> ModuleUpdate:
    if is_factors(part):
        return LoraPair(part.a.to(device), part.b.to(device))
    return part.to(device)


def local_weights(
    model: nn.Module, names: Iterable[str], quantization: Quantization, compute_dtype: torch.dtype,
    device: torch.device | None,
) -> LocalWeights:
    """``model`` (loaded in full precision, its fingerprint taken) as the client's local weights:
    moved to ``device`` as it is (None: left where it was placed), or quantized there with the
    update held beside it."""
    if quantization == "none":
        return MergedWeights(model if device is None else model.to(device), names)
    return HeldUpdate(quantize_model(model, quantization, compute_dtype, device), names, compute_dtype)


def as_local(model: nn.Module | LocalWeights, names: Iterable[str] = ()) -> LocalWeights:
    """A plain model as ``MergedWeights`` of the ``names`` modules (what ``flora-sim`` and the tests
    pass; a round start needs no names, only ``temporarily``); local weights as they are."""
    return model if isinstance(model, LocalWeights) else MergedWeights(model, names)
