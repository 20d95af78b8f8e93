"""Tokenisation (once per data set) and batching: examples to token ids with their trained spans.

An :class:`Example` is prompt + response + eos, its prompt masked on request; a
:class:`Conversation` goes through the tokenizer's chat template with loss on the assistant
turns only (see ``chat``). Records longer than the cutoff are truncated and counted in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from flora.common.data.chat import common_prefix, generation_prompt_ids, require_chat_template, tokenize_conversation
from flora.common.data.examples import IGNORE_INDEX, Conversation, Example, TokenizedExample

log = logging.getLogger(__name__)


def _encode(tokenizer: Any, texts: list[str], cutoff: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids cut to ``cutoff``, and which texts were longer.

    Truncating inside the tokenizer skips its "longer than the model" warning on long records;
    one token of room beyond the cutoff tells a cut record from one that fits exactly.
    """
    probe = tokenizer(texts, truncation=True, max_length=cutoff + 1)["input_ids"]
    long = [i for i, ids in enumerate(probe) if len(ids) > cutoff]
    if long:  # re-encode at the cutoff itself, so that a tokenizer's trailing specials stay
        refit = tokenizer([texts[i] for i in long], truncation=True, max_length=cutoff)["input_ids"]
        for i, ids in zip(long, refit):
            probe[i] = ids
    cut = set(long)
    return probe, [i in cut for i in range(len(texts))]


def _tokenize_plain(examples: list[Example], tokenizer: Any, cutoff: int, mask_prompt: bool) -> tuple[list[TokenizedExample], int]:
    """Prompt and response tokenised together (as the model sees them at generation time: a
    separate tokenisation would insert word-start markers mid-text with SentencePiece); with
    ``mask_prompt`` the masked length is the prompt's own tokens that the joint encoding shares."""
    eos = tokenizer.eos_token_id
    full, cut = _encode(tokenizer, [e.prompt + e.response for e in examples], cutoff)
    prompts = _encode(tokenizer, [e.prompt for e in examples], cutoff)[0] if mask_prompt else [[]] * len(examples)
    result, truncated = [], 0
    for ids, prompt_ids, was_cut in zip(full, prompts, cut):
        if len(ids) < cutoff and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        truncated += was_cut or ids[-1] != eos
        result.append(TokenizedExample.after_prompt(tuple(ids), common_prefix(prompt_ids, ids)))
    return result, truncated


def tokenize_examples(
    examples: Sequence[Example | Conversation], tokenizer: Any, *, cutoff: int = 256, mask_prompt: bool = False
) -> list[TokenizedExample]:
    """Token ids with their trained spans, at most ``cutoff`` each, computed once per data set.

    ``mask_prompt`` masks the prompts of :class:`Example`; a :class:`Conversation` always trains
    on its assistant turns only. The pad token is never used here, so tokenizers without one work.
    """
    if cutoff < 2:
        raise ValueError(f"cutoff must be >= 2 tokens, got {cutoff}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end responses with")
    plain = [i for i, e in enumerate(examples) if isinstance(e, Example)]
    chats = [i for i, e in enumerate(examples) if isinstance(e, Conversation)]
    result: list[TokenizedExample | None] = [None] * len(examples)
    truncated = 0
    if plain:
        tokenized, truncated = _tokenize_plain([examples[i] for i in plain], tokenizer, cutoff, mask_prompt)
        for i, tokens in zip(plain, tokenized):
            result[i] = tokens
    if chats:
        require_chat_template(tokenizer)
    for i in chats:
        result[i], was_cut = tokenize_conversation(tokenizer, examples[i], cutoff)
        truncated += was_cut
    if truncated:
        log.warning("event=examples_truncated count=%d of=%d cutoff=%d hint=%r", truncated, len(examples), cutoff,
                    "raise --cutoff to keep their ends")
    return result  # type: ignore[return-value]


def prompt_ids(tokenizer: Any, example: Example | Conversation) -> list[int]:
    """What a model continues to produce the example's (last) response, e.g. for completions."""
    if isinstance(example, Conversation):
        require_chat_template(tokenizer)
        return generation_prompt_ids(tokenizer, example)
    return tokenizer(example.prompt)["input_ids"]


def collate(batch: Sequence[TokenizedExample], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad a batch to its longest sequence: ``input_ids``, ``attention_mask``, ``labels`` (B, T).

    Padding is marked by the attention mask and by IGNORE_INDEX labels, never by the pad id, so
    ``pad_id`` may be any valid token (a tokenizer's pad token may equal its eos, which is trained).
    Labels hold the token ids inside each example's trained spans and IGNORE_INDEX elsewhere.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, example in enumerate(batch):
        n = len(example)
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        for start, end in example.spans():
            labels[row, start:end] = ids[start:end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
