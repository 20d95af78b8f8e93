"""What data becomes: examples before tokenisation, and tokens with the spans that carry loss.

An :class:`Example` is a prompt and the response the model learns after it (instruction data
rendered with a prompt template, prompt/completion pairs, or plain text with an empty prompt).
A :class:`Conversation` is a chat kept as messages until a tokenizer's own chat template
renders it. Both become a :class:`TokenizedExample`: token ids and the token ranges trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # the label value cross-entropy skips (PyTorch's and Hugging Face's default)


@dataclass(frozen=True, slots=True)
class Example:
    """One training example after the prompt template: the model learns ``response`` after ``prompt``."""

    prompt: str
    response: str


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a chat: ``role`` is system, user or assistant."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """A chat whose assistant turns are learnt; rendered by the tokenizer's chat template.

    ``origin`` ("file: record 3") is for error messages only and takes no part in equality, so
    the same chat read from a JSONL file and from a parquet file is the same example.
    """

    messages: tuple[Message, ...]
    origin: str = field(default="", compare=False)

    def as_dicts(self, end: int | None = None) -> list[dict[str, str]]:
        """The first ``end`` messages (all by default) as ``apply_chat_template`` takes them."""
        return [{"role": m.role, "content": m.content} for m in self.messages[:end]]


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """Token ids and the half-open token ranges ``trained`` that carry loss (None: every token).

    Ranges rather than a prompt length, because a multi-turn chat trains several separate
    assistant turns and masks everything between them.
    """

    input_ids: tuple[int, ...]
    trained: tuple[tuple[int, int], ...] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @classmethod
    def after_prompt(cls, input_ids: tuple[int, ...], prompt_tokens: int) -> TokenizedExample:
        """The tokens with the first ``prompt_tokens`` carrying no loss."""
        return cls(input_ids, ((min(prompt_tokens, len(input_ids)), len(input_ids)),) if prompt_tokens else None)

    def spans(self) -> tuple[tuple[int, int], ...]:
        """The trained ranges, the whole sequence when nothing is masked."""
        return ((0, len(self.input_ids)),) if self.trained is None else self.trained

    @property
    def labelled(self) -> int:
        """How many tokens carry loss."""
        return sum(end - start for start, end in self.spans())
