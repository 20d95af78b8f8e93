"""Base models: the built-in tiny Llama, resolving model arguments, and target-module facts.

Every component accepts a model as a Hub id, a local directory or the built-in name. The built-in
model exists so that the demo and the tests never download anything: it is a small
``LlamaForCausalLM`` built from a config with a byte-level tokenizer built in code, written once
as an ordinary Hugging Face directory into a cache folder, and from then on loaded exactly like a
real model with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from flora.common.architectures import ALL_LINEAR, layer_shape, logical_weight, model_type, target_suffixes
from flora.common.architectures import DEFAULT_TARGET_MODULES  # noqa: F401 - importable here as before

BUILTIN_MODEL = "flora-tiny-llama"
# Bump when the recipe below changes, so that caches built by older code are never reused.
# v2: the tokenizer has a chat template; v3: the shipped pre-trained weights (flora.common.builtin_weights);
# v4: re-trained on prose that repeats and counts (flora.demo.corpus)
_BUILTIN_REVISION = "v4"
_SEED = 20240905

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def cache_root() -> Path:
    """Where built models live: ``$FLORA_CACHE``, else ``$XDG_CACHE_HOME/flora``, else ~/.cache."""
    if env := os.environ.get("FLORA_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flora"


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token, plus four specials.

    Byte-level means any text round-trips with no unknown tokens, and building it needs no
    training corpus, so it is identical everywhere. Its small chat template lets ``--template
    chat`` run on the built-in model.
    """
    from flora.common.data.chat import BUILTIN_CHAT_TEMPLATE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *sorted(alphabet)])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    # Like Llama's own tokenizers: every encoded sequence starts with BOS.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=1024,
        chat_template=BUILTIN_CHAT_TEMPLATE,
    )


def build_tiny_llama(vocab_size: int):
    """The built-in model: 4 layers, hidden size 128, ~0.8 M parameters, seeded weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    # One dedicated generator, consumed in a fixed parameter order: the weights do not depend on
    # global RNG state or on how transformers happens to initialise modules.
    generator = torch.Generator().manual_seed(_SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def _write_builtin(target: Path) -> None:
    """Build the tiny model and its tokenizer and publish them at ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        from flora.common.builtin_weights import load_builtin_weights

        tokenizer = build_tokenizer()
        model = build_tiny_llama(len(tokenizer))
        load_builtin_weights(model)  # the shipped pre-training of this seeded model
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model(name_or_path: str) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts.

    The built-in name becomes its cache directory (built on first use); an existing local
    directory is returned as an absolute path; anything else is passed on as a Hub id.
    """
    if name_or_path == BUILTIN_MODEL:
        target = cache_root() / "models" / f"{BUILTIN_MODEL}-{_BUILTIN_REVISION}"
        if not (target / "config.json").exists():
            _write_builtin(target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name_or_path


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, with a pad token guaranteed (eos, else unk) for batching."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The causal LM for a model argument, in ``dtype`` on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype)
    return model.to(device).eval()


def target_module_shapes(model: nn.Module, target_modules: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """Map every linear (or Conv1D) layer whose name ends with a target suffix to its (out, in) shape.

    ``target_modules`` as the settings give it: None for the family's default, ``["all-linear"]``,
    or suffixes (``flora.common.architectures.target_suffixes``). Suffixes match on whole name
    components, the way PEFT's ``target_modules`` does: "q_proj" matches
    "model.layers.0.self_attn.q_proj" but not "model.layers.0.self_attn.xq_proj".
    """
    suffixes = target_suffixes(model, target_modules)
    if not suffixes:
        raise ValueError("target_modules: at least one module suffix is required")
    shapes = {
        name: shape
        for name, module in model.named_modules()
        if (shape := layer_shape(module)) is not None and any(name == s or name.endswith("." + s) for s in suffixes)
    }
    if not shapes:
        raise ValueError(f"target_modules: no linear layer of the {model_type(model) or 'given'} model matches any of "
                         f"{list(suffixes)} (name its layers' suffixes, or {ALL_LINEAR})")
    return dict(sorted(shapes.items()))


def fingerprint(model: nn.Module, module_names: Iterable[str]) -> str:
    """sha256 over the names, shapes and float32 values of the target modules' base weights.

    Server and clients compare it at Join: merging the same adapters into different base weights
    would silently diverge, so a mismatch must fail before any training. Values are hashed as
    float32 so that a server holding a bfloat16 checkpoint in bfloat16 and a client holding it
    in float32 agree (the cast is exact); weights that differ after rounding still disagree.
    Weights are hashed as (out, in) whatever the layer stores (``architectures.logical_weight``).
    """
    digest = hashlib.sha256()
    for name in sorted(module_names):
        weight = logical_weight(model.get_submodule(name)).to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(weight.shape)}\n".encode())
        digest.update(weight.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
