"""Instruction data: read JSON/JSONL files, render prompts, tokenise, split and batch.

Clients train on it, the server and the simulation evaluate on it, so everything here is pure
(files in, lists and tensors out) and knows nothing of gRPC. Three record forms are accepted and
detected per file: Alpaca (``instruction``, optional ``input``, ``output``), Dolly
(``instruction``, optional ``context``, ``response``; extra keys such as ``category`` are fine)
and plain ``text``. Every record becomes an :class:`Example` (prompt, response); tokenisation
turns that into a :class:`TokenizedExample` once, and :func:`collate` pads batches of those.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value cross-entropy skips (PyTorch's and Hugging Face's default)

T = TypeVar("T")


class DataFormatError(ValueError):
    """A data file that cannot be read as instruction data; the message names file, record, field."""

    def __init__(self, path: str | os.PathLike[str], problem: str, *, index: int | None = None, line: int | None = None):
        self.path, self.index, self.line = str(path), index, line
        where = str(path)
        if index is not None:
            where += f": record {index}" + (f" (line {line})" if line is not None else "")
        elif line is not None:
            where += f": line {line}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class Example:
    """One training example after the prompt template: the model learns ``response`` after ``prompt``."""

    prompt: str
    response: str


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """Token ids of prompt + response + eos; the first ``masked`` tokens carry no loss."""

    input_ids: tuple[int, ...]
    masked: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


# --- record forms ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordForm:
    """A record layout: which keys hold the instruction, its optional input and the response."""

    name: str
    response: str
    instruction: str | None = None  # None: the response is the whole text, no prompt
    input: str | None = None

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(k for k in (self.instruction, self.response) if k is not None)


# Detection order matters: a record with instruction/input/output and a pre-rendered ``text``
# (as some Alpaca exports have) is Alpaca, not text.
FORMS = (
    RecordForm("alpaca", response="output", instruction="instruction", input="input"),
    RecordForm("dolly", response="response", instruction="instruction", input="context"),
    RecordForm("text", response="text"),
)


def _detect_form(record: Mapping[str, Any]) -> RecordForm | None:
    return next((f for f in FORMS if all(k in record for k in f.required)), None)


def _string_field(record: Mapping[str, Any], key: str, optional: bool) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise ValueError(f"field {key!r} must be a string, got {kind}")
    return value


# --- prompt templates -----------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    """Two format strings with ``{instruction}``/``{input}`` fields: with and without an input."""

    with_input: str
    without_input: str

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt for one record; values are substituted as data, never interpreted."""
        template = self.with_input if input else self.without_input
        return template.format_map({"instruction": instruction, "input": input})


TEMPLATES: dict[str, PromptTemplate] = {
    # The Stanford Alpaca template (tatsu-lab/stanford_alpaca, also alpaca-lora's default).
    "alpaca": PromptTemplate(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
    "plain": PromptTemplate(with_input="{instruction}\n{input}\n", without_input="{instruction}\n"),
}


def get_template(spec: str) -> PromptTemplate:
    """A template by registry name, or a custom format string using ``{instruction}``/``{input}``.

    A custom string may only name those two fields, without conversions or format specs, so a
    template from a config file can never reach attributes of the values it formats.
    """
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{" not in spec:
        raise ValueError(f"unknown prompt template {spec!r}: use one of {sorted(TEMPLATES)} or a format string")
    try:
        fields = [(f, conv, fmt) for _, f, fmt, conv in string.Formatter().parse(spec) if f is not None]
    except ValueError as exc:
        raise ValueError(f"prompt template {spec!r} is not a valid format string: {exc}") from None
    for name, conversion, format_spec in fields:
        if name not in ("instruction", "input") or conversion or format_spec:
            raise ValueError(f"prompt template {spec!r}: only {{instruction}} and {{input}} are allowed, got {{{name}}}")
    if "instruction" not in (f for f, _, _ in fields):
        raise ValueError(f"prompt template {spec!r} must contain {{instruction}}")
    return PromptTemplate(spec, spec)


# --- reading files --------------------------------------------------------------------------


def read_records(path: Path) -> list[tuple[int | None, Any]]:
    """(line number or None, parsed value) per record: a JSON array, else one JSON value per line.

    Public so that tools which re-split data files (the demo carving validation sets) keep each
    record in its original form, parsed exactly as training will parse it.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataFormatError(path, "file is empty")
    if stripped.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, f"invalid JSON at column {exc.colno}: {exc.msg}", line=exc.lineno) from None
        return [(None, v) for v in values]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    path, f"invalid JSON ({exc.msg}); expected a JSON array or one JSON object per line", line=number
                ) from None
    return records


def _missing_fields_message(record: Mapping[str, Any]) -> str:
    needs = "; ".join(
        f"{form.name} needs " + ", ".join(repr(k) for k in form.required if k not in record) for form in FORMS
    )
    return f"fits no known form ({needs}); keys present: {sorted(record)}"


def _to_example(record: Mapping[str, Any], form: RecordForm, template: PromptTemplate) -> Example:
    response = _string_field(record, form.response, optional=False)
    if form.instruction is None:
        return Example(prompt="", response=response)
    instruction = _string_field(record, form.instruction, optional=False)
    extra = _string_field(record, form.input, optional=True) if form.input else ""
    return Example(prompt=template.render(instruction, extra), response=response)


def _form_of(record: Mapping[str, Any], file_form: RecordForm | None) -> RecordForm:
    """The record's form, which must be the file's form once the first record has set it."""
    if file_form is not None and all(k in record for k in file_form.required):
        return file_form
    detected = _detect_form(record)
    if detected is None:
        if file_form is None:
            raise ValueError(_missing_fields_message(record))
        missing = [k for k in file_form.required if k not in record]
        raise ValueError(f"missing field(s) {missing} of the file's {file_form.name} form")
    if file_form is not None:
        raise ValueError(
            f"in {detected.name} form, but the file's first record is in {file_form.name} form (one form per file)"
        )
    return detected


def load_file(path: str | os.PathLike[str], template: PromptTemplate) -> list[Example]:
    """All records of one file as examples; the first record decides the file's form."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise DataFormatError(path, "file holds no records")
    form: RecordForm | None = None
    examples = []
    for index, (line, record) in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise ValueError(f"is a {type(record).__name__}, not a JSON object")
            form = _form_of(record, form)
            examples.append(_to_example(record, form, template))
        except ValueError as exc:
            raise DataFormatError(path, str(exc), index=index, line=line) from None
    log.debug("read %d %s records from %s", len(examples), form.name if form else "?", path)
    return examples


def load_examples(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], template: str | PromptTemplate = "alpaca"
) -> list[Example]:
    """Examples from one or more JSON/JSONL files, in file order, each file's form auto-detected."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    chosen = template if isinstance(template, PromptTemplate) else get_template(template)
    examples = [example for path in paths for example in load_file(path, chosen)]
    if not examples:
        raise ValueError("no data files given")
    return examples


# --- tokenisation, batching, splitting ------------------------------------------------------


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer: Any, texts: list[str], cutoff: int) -> list[list[int]]:
    # Truncating inside the tokenizer skips its "longer than the model" warning on long records.
    return tokenizer(texts, truncation=True, max_length=cutoff)["input_ids"]


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, *, cutoff: int = 256, mask_prompt: bool = False
) -> list[TokenizedExample]:
    """Token ids of prompt + response + eos, cut to ``cutoff`` tokens, computed once per data set.

    Prompt and response are tokenised together (as the model sees them at generation time: a
    separate tokenisation would insert word-start markers mid-text with SentencePiece); with
    ``mask_prompt`` the masked length is the prompt's own tokens that the joint encoding shares.
    The pad token is never used here, so tokenizers without one work.
    """
    if cutoff < 2:
        raise ValueError(f"cutoff must be >= 2 tokens, got {cutoff}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to end responses with")
    if not examples:
        return []
    full = _encode(tokenizer, [e.prompt + e.response for e in examples], cutoff)
    prompts = _encode(tokenizer, [e.prompt for e in examples], cutoff) if mask_prompt else [[]] * len(examples)
    result = []
    for ids, prompt_ids in zip(full, prompts):
        if len(ids) < cutoff and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        result.append(TokenizedExample(tuple(ids), _common_prefix(prompt_ids, ids)))
    return result


def collate(batch: Sequence[TokenizedExample], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad a batch to its longest sequence: ``input_ids``, ``attention_mask``, ``labels`` (B, T).

    Padding is marked by the attention mask and by IGNORE_INDEX labels, never by the pad id, so
    ``pad_id`` may be any valid token (a tokenizer's pad token may equal its eos, which is trained).
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
        labels[row, example.masked : n] = ids[example.masked :]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_examples(items: Sequence[T], validation: float | int, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split into (train, validation) deterministically: the same seed always picks the same items.

    ``validation`` is a fraction in (0, 1) when a float and a count when an int; both parts keep
    the input order. At least one item stays for training.
    """
    n = len(items)
    if isinstance(validation, bool) or not isinstance(validation, (int, float)):
        raise TypeError(f"validation must be a fraction (float) or a count (int), got {validation!r}")
    if isinstance(validation, float):
        if not 0.0 < validation < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {validation}")
        count = max(1, round(n * validation))
    else:
        if validation < 0:
            raise ValueError(f"validation count must be >= 0, got {validation}")
        count = validation
    if count >= n:
        raise ValueError(f"a validation set of {count} leaves none of the {n} examples for training")
    chosen = set(random.Random(seed).sample(range(n), count))
    train = [item for i, item in enumerate(items) if i not in chosen]
    return train, [item for i, item in enumerate(items) if i in chosen]


# --- folders of per-client files ------------------------------------------------------------

DATA_SUFFIXES = (".json", ".jsonl")


def _natural_key(path: Path) -> list[Any]:
    """Sort client_2 before client_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def data_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """A folder of one data file per client: (client files in natural order, validation files).

    Files whose name starts with ``validation`` hold held-out data (the demo's sample data writes
    one), not a client's. The demo and the simulator read folders the same way through this.
    """
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} is not a directory")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES), key=_natural_key)
    validation = [p for p in files if p.name.startswith("validation")]
    clients = [p for p in files if p not in validation]
    if not clients:
        raise ValueError(f"data folder {folder} holds no .json or .jsonl client files (one per client expected)")
    return clients, validation
