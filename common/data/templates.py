"""Prompt templates: how a parsed record becomes an :class:`Example` or a :class:`Conversation`.

Instruction templates (``alpaca``, ``plain``, or a format string with ``{instruction}`` and
``{input}``) render the prompt as text, for base models. ``chat`` keeps the record as messages
for the tokenizer's own chat template (``apply_chat_template``), which is what an instruct model
was trained on: an instruction record becomes one user turn and one assistant turn.
Prompt/completion pairs keep their prompt verbatim and plain text is never templated.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from flora.common.data.examples import Conversation, Example, Message
from flora.common.data.forms import Completion, Instruction, ParsedRecord, Text

CHAT = "chat"


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


Template = PromptTemplate | str  # a PromptTemplate, or CHAT for the tokenizer's chat template


def get_template(spec: str) -> Template:
    """A template by registry name, ``chat``, or a custom format string using ``{instruction}``/``{input}``.

    A custom string may only name those two fields, without conversions or format specs, so a
    template from a config file can never reach attributes of the values it formats.
    """
    if spec == CHAT:
        return CHAT
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{" not in spec:
        raise ValueError(f"unknown prompt template {spec!r}: use one of {sorted([*TEMPLATES, CHAT])} or a format string")
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


def to_example(record: ParsedRecord, template: Template) -> Example | Conversation:
    """The example ``template`` makes of a parsed record (chat records need the chat template)."""
    chat = template == CHAT
    match record:
        case Text():
            return Example("", record.text)
        case Conversation():
            if not chat:
                raise ValueError("chat records are rendered by the model's own chat template: use --template chat")
            return record
        case Completion():
            prompt, response = record.prompt, record.completion
            if not chat:
                return Example(prompt, response)
        case Instruction():
            if not chat:
                return Example(template.render(record.instruction, record.input), record.response)
            prompt = f"{record.instruction}\n\n{record.input}" if record.input else record.instruction
            response = record.response
    return Conversation((Message("user", prompt), Message("assistant", response)))
