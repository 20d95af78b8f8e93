"""Tiny models of every supported family, built from a config in code (nothing downloaded).

Each is a real Hugging Face directory (seeded weights, the built-in byte-level tokenizer) that
the server and the clients load by path like any other base model. Sizes are the smallest the
families accept: hidden 32, 2 layers, 4 heads (2 for keys and values where a family has GQA).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flora.common.basemodel import build_tokenizer

_SHARED = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family: str):
    import transformers as t

    configs = {
        "llama": lambda: t.LlamaConfig(**_SHARED),
        "mistral": lambda: t.MistralConfig(**_SHARED),
        "qwen2": lambda: t.Qwen2Config(**_SHARED),
        "qwen3": lambda: t.Qwen3Config(**_SHARED, head_dim=8),
        "gemma2": lambda: t.Gemma2Config(**_SHARED, head_dim=8),
        "gemma3_text": lambda: t.Gemma3TextConfig(**_SHARED, head_dim=8),
        "phi3": lambda: t.Phi3Config(**_SHARED),
        "gpt2": lambda: t.GPT2Config(vocab_size=260, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=1, eos_token_id=2),
    }
    return configs[family]()


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2")


def build_family(family: str, seed: int = 0) -> nn.Module:
    """A tiny model of ``family`` (a Hugging Face ``model_type``) with seeded weights, N(0, 0.02) but norms near 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_config(family))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            norm = param.dim() == 1 and name.endswith("weight")  # the only 1-D weights: norms' scales, near 1
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02 + (1.0 if norm else 0.0))
    return model.eval()


def write_family(folder: Path, family: str, seed: int = 0) -> Path:
    """``folder`` as a Hugging Face model directory of a tiny ``family`` model and its tokenizer."""
    build_family(family, seed).save_pretrained(folder, safe_serialization=True)
    build_tokenizer().save_pretrained(folder)
    return folder
