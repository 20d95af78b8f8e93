"""What the run taught the model, in words: held-out prompts completed by the base model, by
each client's own model and by the merged global model, scored by exact match per task.

Greedy decoding of a few tokens: deterministic, quick on a CPU, and enough to see a model that
learnt a task next to one that did not. The prompts come from the validation data, which no
client trained on; a record's task is its ``category`` (Dolly's field; the built-in data sets
it), else its file's name. Chat records are completed through the tokenizer's chat template.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flora.common.basemodel import load_model, load_tokenizer, target_module_shapes
from flora.common.data import Conversation, Example, ReadOptions, load_source, prompt_ids, read_source
from flora.common.merge import module_weights
from flora.demo.single_clients import single_client_weights


@dataclass(frozen=True)
class HeldOut:
    """One held-out prompt: its task, the example to continue, the question as shown, the answer."""

    task: str
    example: Example | Conversation
    question: str
    expected: str


def held_out_prompts(validation: Sequence[Path], per_task: int, options: ReadOptions = ReadOptions()) -> list[HeldOut]:
    """The first ``per_task`` held-out examples of every task, tasks in order of appearance."""
    chosen: dict[str, list[HeldOut]] = {}
    for path in validation:
        for record, example in zip(read_source(path), load_source(path, options)):
            value = record.value
            bucket = chosen.setdefault(str(value.get("category") or path.stem), [])
            if len(bucket) < per_task:
                bucket.append(HeldOut(str(value.get("category") or path.stem), example, _question(value, example),
                                      _expected(example).strip()))
    return [item for bucket in chosen.values() for item in bucket]


def _expected(example: Example | Conversation) -> str:
    if isinstance(example, Conversation):
        return [m.content for m in example.messages if m.role == "assistant"][-1]
    return example.response


def _question(record: Mapping, example: Example | Conversation) -> str:
    """The instruction and its input without the template's boilerplate, or a chat's last user turn."""
    if isinstance(example, Conversation):
        last = max(i for i, m in enumerate(example.messages) if m.role == "assistant")
        user = next((m.content for m in reversed(example.messages[:last]) if m.role == "user"), "")
        return " / ".join(line.strip() for line in user.splitlines() if line.strip())
    parts = [record.get("instruction"), record.get("input") or record.get("context")]
    return " / ".join(str(p).strip() for p in parts if p and str(p).strip()) or example.prompt


@torch.inference_mode()
def complete(model: nn.Module, tokenizer, examples: Sequence[Example | Conversation], max_new_tokens: int,
             max_prompt_tokens: int) -> list[str]:
    """Greedy continuations of all prompts in one left-padded batch, each cut to its first line.

    A prompt longer than ``max_prompt_tokens`` keeps its end (where the question and the
    response marker are), as training's cutoff would leave it room for nothing else anyway.
    """
    prompts = [prompt_ids(tokenizer, example)[-max_prompt_tokens:] for example in examples]
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in prompts])  # (N, T)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])  # (N, T)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # (N, T + new)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [text.strip().splitlines()[0].strip() if text.strip() else "" for text in texts]


def answer_budget(tokenizer, items: Sequence[HeldOut], cap: int = 48) -> int:
    """New tokens enough for the longest expected answer plus its end, at most ``cap``."""
    longest = max(len(tokenizer(item.expected, add_special_tokens=False).input_ids) for item in items)
    return min(cap, longest + 2)


def compare(
    base_model: str, method: str, state_dir: Path, last: Mapping, checkpoint: Path, validation: Sequence[Path],
    labels: tuple[str, str], cutoff: int, options: ReadOptions, target_modules: Sequence[str] | None = None,
    per_task: int = 12,
) -> tuple[list[HeldOut], dict[str, list[str]]]:
    """Held-out prompts and, per model, its greedy answers: ``labels`` (base, merged) and "<client> alone".

    ``target_modules`` are the run's (as flora-server's flag; None: the model family's default).

    One copy of the base model serves the base and every client's own model (their target-module
    weights swapped in); the merged model is the exported checkpoint, loaded as a user loads it.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo's output is a report, not a loading screen
    items = held_out_prompts(validation, per_task, options)
    tokenizer, model = load_tokenizer(base_model), load_model(base_model)
    budget = answer_budget(tokenizer, items)
    answer = functools.partial(complete, tokenizer=tokenizer, examples=[item.example for item in items], max_new_tokens=budget,
                               max_prompt_tokens=cutoff - budget)
    names = sorted(target_module_shapes(model, target_modules))
    live = module_weights(model, names)
    base_weights = {name: weight.detach().clone() for name, weight in live.items()}
    answers = {labels[0]: answer(model)}
    for client, weights in single_client_weights(state_dir, base_weights, method, last).items():
        with torch.no_grad():
            for name, weight in live.items():
                weight.copy_(weights[name])
        answers[f"{client} alone"] = answer(model)
    answers[labels[1]] = answer(load_model(str(checkpoint)))
    return items, answers


def exact(answer: str, item: HeldOut) -> bool:
    """Whether a completion (one line, spaces trimmed) is exactly the expected answer."""
    return bool(item.expected) and answer == item.expected
