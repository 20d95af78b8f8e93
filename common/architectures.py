"""Model families: the layers LoRA adapts by default, and how each layer stores its weight.

Everything else in flora works on one convention, the LoRA paper's: a target module's weight W is
(out_features, in_features), its update is B A with A (r, in) and B (out, r), and every payload,
shape check and merge uses that orientation. This module is where a family's own habits meet it:

- the default target modules of each supported ``model_type`` (as PEFT's defaults: the attention
  query and value projections, or the fused projection that holds them), and ``all-linear``;
- GPT-2's ``Conv1D`` stores W transposed, (in, out) (PEFT's ``fan_in_fan_out``): its weight is
  handed out as a transposed view, so merges and checks written for (out, in) apply unchanged and
  write through to the stored weight.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

ALL_LINEAR = "all-linear"
# The attention query and value projections: the LoRA paper's choice and most families' names.
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
# Per Hugging Face ``model_type``: what an unset ``target_modules`` adapts. Phi-3 fuses q, k and v
# into qkv_proj, GPT-2 into c_attn; adapting the fused layer is the nearest to "q and v".
FAMILY_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": DEFAULT_TARGET_MODULES,
    "mistral": DEFAULT_TARGET_MODULES,
    "qwen2": DEFAULT_TARGET_MODULES,
    "qwen3": DEFAULT_TARGET_MODULES,
    "gemma2": DEFAULT_TARGET_MODULES,
    "gemma3_text": DEFAULT_TARGET_MODULES,
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
}


def model_type(model: nn.Module) -> str:
    """The Hugging Face ``model_type`` of ``model`` ("" for a model without a config)."""
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of a layer LoRA can adapt, None for any other module."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return None


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight as (in, out): PEFT's ``fan_in_fan_out``."""
    return isinstance(module, Conv1D)


def logical_weight(module: nn.Module) -> Tensor:
    """The layer's weight as (out, in), detached and sharing its storage: writes reach the layer."""
    weight = module.weight.detach()
    return weight.T if is_transposed(module) else weight


def fan_in_fan_out(model: nn.Module, names: Collection[str]) -> bool:
    """PEFT's ``fan_in_fan_out`` for adapting the named layers: whether they store (in, out)."""
    return any(is_transposed(model.get_submodule(name)) for name in names)


def target_suffixes(model: nn.Module, requested: Sequence[str] | None) -> tuple[str, ...]:
    """The module suffixes a ``target_modules`` setting stands for, on this model.

    None is the family's default (``DEFAULT_TARGET_MODULES`` for a family not listed above);
    ``["all-linear"]`` is, as in PEFT, the last name component of every linear or Conv1D layer
    but the output layer (adapting the LM head is rarely wanted and needs its tied embedding too);
    anything else names suffixes itself.
    """
    if requested is None:
        return FAMILY_TARGET_MODULES.get(model_type(model), DEFAULT_TARGET_MODULES)
    check_target_names(requested)
    if ALL_LINEAR not in requested:
        return tuple(requested)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if layer_shape(module) is not None and module is not output}
    if output is not None:
        names.discard(next(name for name, module in model.named_modules() if module is output).rsplit(".", 1)[-1])
    return tuple(sorted(names))


def check_target_names(requested: Sequence[str]) -> None:
    """Refuse a malformed ``target_modules`` setting: each entry a dotted module name, or
    ``all-linear`` alone (it already names every layer)."""
    for entry in requested:
        if entry != ALL_LINEAR and not (entry and all(p.isidentifier() or p.isdigit() for p in entry.split("."))):
            raise ValueError(f"target module {entry!r} is not a dotted module name (or {ALL_LINEAR})")
    if ALL_LINEAR in requested and len(set(requested)) > 1:
        raise ValueError(f"{ALL_LINEAR!r} stands alone, not beside {sorted(set(requested) - {ALL_LINEAR})}")
