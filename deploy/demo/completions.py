"""What the run taught the model, in words: held-out prompts completed by the base model and by
the merged global model, side by side.

Greedy decoding and a few tokens: deterministic, quick on a CPU, and enough to see a model that
learnt the tasks (``42 + 17`` -> ``59``) next to one that did not. The prompts come from the
validation file, which no client trained on; the expected answer is shown beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flora.common.basemodel import load_model, load_tokenizer
from flora.common.data import Conversation, Example, ReadOptions, load_source, prompt_ids


@dataclass(frozen=True)
class Completion:
    """One held-out prompt, its expected response and what each model wrote."""

    prompt: str
    expected: str
    base: str
    merged: str


def pick_prompts(validation: Sequence[Path], count: int, options: ReadOptions = ReadOptions()) -> list[Example | Conversation]:
    """``count`` held-out examples of different instructions (tasks) where there are enough."""
    examples = [example for path in validation for example in load_source(path, options)]
    chosen: dict[str, Example | Conversation] = {}
    for example in examples:
        chosen.setdefault(_question(example).split(" / ")[0], example)
    picked = list(chosen.values())[:count]
    return picked + [e for e in examples if e not in picked][: count - len(picked)]


@torch.inference_mode()
def complete(model_path: str, prompts: Sequence[Example | Conversation], max_new_tokens: int) -> list[str]:
    """Greedy continuations of each prompt (a chat's through the chat template), first line only."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo's output is a report, not a loading screen
    tokenizer, model = load_tokenizer(model_path), load_model(model_path)
    texts = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])  # (1, T)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        texts.append(text.strip().splitlines()[0].strip() if text.strip() else "(no text)")
    return texts


def compare(base_model: str, merged_checkpoint: Path, validation: Sequence[Path], count: int = 4,
            max_new_tokens: int = 16, options: ReadOptions = ReadOptions()) -> list[Completion]:
    """The same held-out prompts through the base model and the merged checkpoint."""
    examples = pick_prompts(validation, count, options)
    base = complete(base_model, examples, max_new_tokens)
    merged = complete(str(merged_checkpoint), examples, max_new_tokens)
    return [Completion(_question(e), _expected(e), b, m) for e, b, m in zip(examples, base, merged)]


def _expected(example: Example | Conversation) -> str:
    if isinstance(example, Conversation):
        return [m.content for m in example.messages if m.role == "assistant"][-1]
    return example.response


def _question(example: Example | Conversation) -> str:
    """The instruction and input of an Alpaca-form prompt (the boilerplate dropped), or a chat's
    last user turn, on one line."""
    if isinstance(example, Conversation):
        last = max(i for i, m in enumerate(example.messages) if m.role == "assistant")
        user = next((m.content for m in reversed(example.messages[:last]) if m.role == "user"), "")
        return " / ".join(line.strip() for line in user.splitlines() if line.strip())
    prompt = example.prompt
    parts = [p.split(":\n", 1)[1].strip() for p in prompt.split("### ")[1:] if ":\n" in p]
    return " / ".join(p for p in parts if p) or prompt.strip()
