"""4-bit and 8-bit bases: a loaded model's linear layers replaced by bitsandbytes' quantized ones.

A data holder with one 16-24 GB GPU cannot hold a 7-8B base in bf16; QLoRA's answer is a frozen
4-bit (NF4 or FP4) or 8-bit base with LoRA trained beside it. Quantizing here, after an ordinary
load in the checkpoint's own dtype (memory-mapped, never a float32 copy), rather than through
``from_pretrained(quantization_config=...)``, is what lets the client hash the target modules'
*unquantized* weights first (the fingerprint the server compares at Join) and then drop them,
one layer at a time. bitsandbytes quantizes a ``Params4bit``/``Int8Params`` when
it is moved to a device, on CPU too (bitsandbytes >= 0.49), which is how CI tests this path.

bitsandbytes is an optional extra (``flora-fl[qlora]``): imported only when a quantization is
asked for, and a missing install is reported with the pip command that fixes it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

Quantization = Literal["none", "nf4", "fp4", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "fp4", "int8")
INSTALL_HINT = "pip install 'flora-fl[qlora]'"
# Left in full precision as transformers' bitsandbytes integration does: the output projection's
# rounding would shift every logit, and it is one layer of many.
_SKIPPED = ("lm_head",)


class MissingExtra(ImportError):
    """An optional dependency that a chosen setting needs is not installed; the message says how to add it."""


def bitsandbytes() -> Any:
    """The bitsandbytes module, or MissingExtra naming the pip command that installs it."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MissingExtra(f"quantize: bitsandbytes is not installed ({exc}); {INSTALL_HINT}") from None
    return bnb


def quantize_model(model: nn.Module, quantization: Quantization, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but the output head) by a frozen quantized layer on ``device``.

    The rest of the model (embeddings, norms, head) moves to ``device`` in ``compute_dtype``. PEFT
    wraps the quantized layers with its own bitsandbytes LoRA layers when the model says it is
    loaded in 4 or 8 bits, which is what the flags set at the end tell it. Returns ``model``.
    """
    if quantization == "none":
        raise ValueError("quantize_model needs a quantization, not 'none'")
    bnb = bitsandbytes()
    quantized = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in _SKIPPED:
                setattr(parent, name, _quantized_linear(bnb, child, quantization, compute_dtype).to(device))
                quantized += 1
    if not quantized:  # GPT-2's Conv1D layers, say: a "4-bit" client at full precision would be a lie
        raise ValueError(f"quantize: {type(model).__name__} has no nn.Linear layer besides its output head to quantize "
                         "(transposed Conv1D layers are not supported): use --quantize none")
    for param in model.parameters():
        if param.dtype.is_floating_point:
            # A copy even in the same dtype: a tensor left as loaded would keep the whole memory-mapped
            # checkpoint resident (its pages were read to quantize), a bf16 model beside the 4-bit one.
            param.data = param.data.to(compute_dtype, copy=True)
        param.requires_grad_(False)
    model.to(device)
    model.is_loaded_in_4bit = quantization in ("nf4", "fp4")
    model.is_loaded_in_8bit = quantization == "int8"
    return model


def _quantized_linear(bnb: Any, linear: nn.Linear, quantization: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight, quantized when it is moved to a device."""
    has_bias = linear.bias is not None
    # In the compute dtype (a copy of this one layer when the checkpoint's differs): a 4-bit layer
    # dequantizes to the dtype it was quantized from, so a bf16 checkpoint would otherwise put
    # bf16 rounding into a float32 client's forward.
    weight = linear.weight.detach().to(compute_dtype)
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype, quant_type=quantization)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quantization)
        # Its CPU inference path repacks the weight in place (AVX512-BF16 layout), asserting on
        # widths that are not a multiple of 32 (the built-in model's 344); keep one layout.
        layer.support_avx512bf16_for_cpu = False
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.train(linear.training)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes quantized linear layer (without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes") and hasattr(module, "weight")


def dequantized_weight(module: nn.Module) -> Tensor:
    """The (out_features, in_features) float32 weight a quantized layer holds.

    A 4-bit layer's forward multiplies by exactly this (up to the compute dtype's rounding): the
    reference the tests hold a 4-bit client's forward to. An int8 layer (LLM.int8) also rounds
    its input to int8 row by row, so its forward is this weight's product only to that rounding.
    """
    bnb = bitsandbytes()
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    if isinstance(module, bnb.nn.Linear8bitLt):
        # Row-wise absmax int8: W[i, j] = q[i, j] * SCB[i] / 127.
        return weight.data.to(torch.float32) * (weight.SCB.to(torch.float32)[:, None] / 127.0)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear layer")
