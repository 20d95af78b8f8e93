"""MMLU accuracy by comparing the loss of each choice: the FLoRA paper's metric, at any model size.

Each record of ../shared/data/mmlu-1444 asks a question with options A-D in its ``input`` and
answers "The answer is: C. <text>". Every option is scored as that answer after the question's
alpaca prompt: the mean cross-entropy per response token, prompt masked; the option with the
lowest loss is the model's answer (ties go to the earliest option). A model of a few hundred
thousand parameters sits near chance (25 %); the number is reported, not interpreted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora.common.data import IGNORE_INDEX, TokenizedExample, collate, get_template
from flora.common.evaluate import shifted_targets

LETTERS = "ABCD"
_OPTIONS = re.compile(r"Options: A\. (.*), B\. (.*), C\. (.*), D\. (.*)$", re.S)
_ANSWER = re.compile(r"The answer is: ([ABCD])\. ", re.S)


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: the four scored sequences and the index of the right one."""

    choices: tuple[TokenizedExample, ...]
    answer: int


def _tokenize(tokenizer: Any, prompt: str, response: str, max_length: int) -> TokenizedExample:
    """Prompt + response with the prompt masked; an over-long prompt loses its start, never the answer."""
    ids = tokenizer(prompt + response)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    masked = next((i for i, (x, y) in enumerate(zip(ids, prompt_ids)) if x != y), min(len(ids), len(prompt_ids)))
    cut = max(0, len(ids) - max_length)
    return TokenizedExample.after_prompt(tuple(ids[cut:]), max(0, masked - cut))


def load_questions(path: Path, tokenizer: Any, max_length: int, limit: int | None = None) -> list[Question]:
    """The questions of an MMLU-style JSON file (first ``limit`` of them), each option tokenised."""
    template = get_template("alpaca")
    questions = []
    for number, record in enumerate(json.loads(path.read_text())[:limit], start=1):
        options, answer = _OPTIONS.search(record["input"]), _ANSWER.match(record["output"])
        if options is None or answer is None:
            raise ValueError(f"{path}: record {number} does not have options A-D and 'The answer is: X. ...'")
        prompt = template.render(record["instruction"], record["input"])
        choices = tuple(
            _tokenize(tokenizer, prompt, f"The answer is: {letter}. {text.strip()}", max_length)
            for letter, text in zip(LETTERS, options.groups())
        )
        questions.append(Question(choices, LETTERS.index(answer.group(1))))
    return questions


@torch.no_grad()
def choice_losses(model: nn.Module, examples: list[TokenizedExample], batch_size: int = 32) -> list[float]:
    """Mean cross-entropy per labelled token of each example, in input order."""
    model.eval()
    losses = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        targets = shifted_targets(batch["labels"])  # (B, T)
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
        per_token = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
        counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        losses += (per_token.sum(dim=1) / counts).tolist()
    return losses


def accuracy(model: nn.Module, questions: list[Question], batch_size: int = 32) -> float:
    """Fraction of questions whose right option has the lowest loss."""
    flat = [choice for q in questions for choice in q.choices]
    losses = choice_losses(model, flat, batch_size)
    right = 0
    for i, question in enumerate(questions):
        scores = losses[4 * i : 4 * i + 4]
        right += scores.index(min(scores)) == question.answer
    return right / len(questions)
