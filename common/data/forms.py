"""Record forms: which keys of a record hold what, detected per file or forced with --data-format.

Forms, in detection order (the first whose required keys a record has):
  chat        ``messages``: [{"role": system|user|assistant, "content": ...}, ...] (OpenAI style)
  sharegpt    ``conversations``: [{"from": system|human|gpt, "value": ...}, ...]
  alpaca      ``instruction``, optional ``input``, ``output``
  dolly       ``instruction``, optional ``context``, ``response`` (extra keys such as ``category`` are fine)
  completion  ``prompt``, ``completion``
  text        ``text`` (continued pre-training: loss on every token)
A record carrying a pre-rendered ``text`` beside its instruction fields is therefore Alpaca.
``--field instruction=question`` reads a form's key from a differently named column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from flora.common.data.errors import FieldError
from flora.common.data.examples import Conversation, Message


@dataclass(frozen=True, slots=True)
class Instruction:
    """An instruction, its optional input, and the response to learn."""

    instruction: str
    input: str
    response: str


@dataclass(frozen=True, slots=True)
class Completion:
    """A prompt given verbatim and the completion to learn."""

    prompt: str
    completion: str


@dataclass(frozen=True, slots=True)
class Text:
    """Plain text, every token learnt."""

    text: str


ParsedRecord = Union[Instruction, Completion, Text, Conversation]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def string_field(record: Mapping[str, Any], key: str, optional: bool = False) -> str:
    """``record[key]`` as a string ("" for a missing or null optional field)."""
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise FieldError(key, f"must be a string, got {_kind(value)}")
    return value


def _messages(key: str, role_key: str, content_key: str, roles: Mapping[str, str]) -> Callable[[Mapping[str, Any]], Conversation]:
    """A parser of a list of turns whose role names ``roles`` maps to system/user/assistant."""

    def parse(record: Mapping[str, Any]) -> Conversation:
        turns = record[key]
        if not isinstance(turns, list) or not turns:
            raise FieldError(key, f"must be a non-empty list of turns, got {_kind(turns)}")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, Mapping):
                raise FieldError(f"{key}[{i}]", f"must be an object with {role_key!r} and {content_key!r}, got {_kind(turn)}")
            role = turn.get(role_key)
            if role not in roles:
                raise FieldError(f"{key}[{i}].{role_key}", f"must be one of {sorted(roles)}, got {role!r}")
            content = turn.get(content_key)
            if not isinstance(content, str):
                raise FieldError(f"{key}[{i}].{content_key}", f"must be a string, got {_kind(content)}")
            messages.append(Message(roles[role], content))
        if not any(m.role == "assistant" for m in messages):
            raise FieldError(key, "has no assistant turn to learn from")
        return Conversation(tuple(messages))

    return parse


def _instruction(response: str, input: str) -> Callable[[Mapping[str, Any]], Instruction]:
    def parse(record: Mapping[str, Any]) -> Instruction:
        return Instruction(string_field(record, "instruction"), string_field(record, input, optional=True),
                           string_field(record, response))

    return parse


@dataclass(frozen=True)
class RecordForm:
    """A record layout: the keys it needs, the optional keys it reads, and how to parse it."""

    name: str
    required: tuple[str, ...]
    parse: Callable[[Mapping[str, Any]], ParsedRecord]
    optional: tuple[str, ...] = ()


_CHAT_ROLES = {r: r for r in ("system", "user", "assistant")}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

FORMS = (
    RecordForm("chat", ("messages",), _messages("messages", "role", "content", _CHAT_ROLES)),
    RecordForm("sharegpt", ("conversations",), _messages("conversations", "from", "value", _SHAREGPT_ROLES)),
    RecordForm("alpaca", ("instruction", "output"), _instruction("output", "input"), optional=("input",)),
    RecordForm("dolly", ("instruction", "response"), _instruction("response", "context"), optional=("context",)),
    RecordForm("completion", ("prompt", "completion"),
               lambda r: Completion(string_field(r, "prompt"), string_field(r, "completion"))),
    RecordForm("text", ("text",), lambda r: Text(string_field(r, "text"))),
)
FORMS_BY_NAME = {form.name: form for form in FORMS}
DATA_FORMATS = ("auto", *FORMS_BY_NAME)
CHAT_FORMS = ("chat", "sharegpt")
FIELD_NAMES = tuple(sorted({key for form in FORMS for key in (*form.required, *form.optional)}))


def detect_form(record: Mapping[str, Any]) -> RecordForm:
    """The first form whose required keys ``record`` has, or an error listing what each needs."""
    form = next((f for f in FORMS if all(k in record for k in f.required)), None)
    if form is None:
        needs = "; ".join(f"{f.name} needs " + ", ".join(repr(k) for k in f.required) for f in FORMS)
        raise FieldError(None, f"fits no known form ({needs}); keys present: {sorted(record)} "
                         "(--field FORM_KEY=YOUR_KEY maps other names)")
    return form


def check_form(record: Mapping[str, Any], form: RecordForm, how: str) -> None:
    """``record`` has every key ``form`` requires (``how`` says why it is that form)."""
    for key in form.required:
        if key not in record:
            raise FieldError(key, f"is missing: the file's records are in {form.name} form ({how})")


def parse_fields(specs: Sequence[str]) -> dict[str, str]:
    """``["instruction=question", ...]`` as {form key: the source's column}; each form key once."""
    mapping: dict[str, str] = {}
    for spec in specs:
        target, sep, source = (part.strip() for part in spec.partition("="))
        if not sep or not target or not source:
            raise ValueError(f"--field {spec!r}: expected FORM_KEY=YOUR_KEY, e.g. instruction=question")
        if target not in FIELD_NAMES:
            raise ValueError(f"--field {spec!r}: {target!r} is no form's key; the keys are {list(FIELD_NAMES)}")
        if target in mapping:
            raise ValueError(f"--field {spec!r}: {target!r} is mapped twice")
        mapping[target] = source
    return mapping


def map_fields(record: Mapping[str, Any], fields: Mapping[str, str]) -> Mapping[str, Any]:
    """The record with each mapped column also under its form key (a missing column is an error)."""
    if not fields:
        return record
    mapped = dict(record)
    for target, source in fields.items():
        if source not in record:
            raise FieldError(source, f"is missing (read as {target!r} by --field {target}={source})")
        mapped[target] = record[source]
    return mapped
