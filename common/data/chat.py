"""Chats through the tokenizer's own chat template, with loss on exactly the assistant's tokens.

Real instruct templates (Llama 3, Qwen 2.5/3, Gemma, Mistral, Phi-3) carry no ``{% generation %}``
markers, so the assistant spans are found by rendering, not by the template's cooperation: turn
k's span starts where the rendering of the turns before it with the generation prompt stops
agreeing with the whole chat's rendering (so whatever the template puts after the generation
prompt, such as Qwen 3's empty think block, is learnt as the model must produce it), and ends
after the turn's content and the end-of-turn special token that follows it (``<|eot_id|>``,
``<|im_end|>``, ``<end_of_turn>``, ``</s>``), which the model must learn to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flora.common.data.examples import Conversation, TokenizedExample

# The built-in tokenizer's template (Zephyr-like, short markers because every byte is a token).
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def require_chat_template(tokenizer: Any) -> None:
    """A ValueError naming the fix when ``--template chat`` meets a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"--template chat: the tokenizer of {tokenizer.name_or_path!r} has no chat template; use an instruct "
            "model (its tokenizer_config.json or chat_template.jinja holds one) or an instruction template "
            "such as --template alpaca"
        )


def render_chat(tokenizer: Any, conversation: Conversation, end: int | None = None, *, generation_prompt: bool = False) -> str:
    """The template's text of the first ``end`` messages, optionally with the generation prompt."""
    try:
        return tokenizer.apply_chat_template(
            conversation.as_dicts(end), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja's TemplateError, or a template's own raise_exception
        where = f"{conversation.origin}: " if conversation.origin else ""
        raise ValueError(f"{where}the chat template of {tokenizer.name_or_path!r} refused the chat: {exc}") from None


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (characters, token ids) ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def assistant_spans(tokenizer: Any, conversation: Conversation, text: str) -> list[tuple[int, int]]:
    """Character ranges of ``text`` (the whole chat rendered) that the assistant turns produce."""
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    spans = []
    for k, message in enumerate(conversation.messages):
        if message.role != "assistant":
            continue
        start = common_prefix(render_chat(tokenizer, conversation, k, generation_prompt=True), text)
        content = message.content.strip()
        found = text.find(content, start)
        if found < 0:
            where = f"{conversation.origin}: " if conversation.origin else ""
            raise ValueError(f"{where}the chat template does not render assistant turn {k + 1}'s text as given")
        end = found + len(content)
        after = end + len(text[end:]) - len(text[end:].lstrip())
        closing = next((s for s in specials if text.startswith(s, after)), None)
        spans.append((start, after + len(closing) if closing else end))
    return spans


def tokenize_conversation(tokenizer: Any, conversation: Conversation, cutoff: int) -> tuple[TokenizedExample, bool]:
    """The chat's tokens (at most ``cutoff``) with loss on its assistant spans; and whether it was cut.

    A token carries loss when its characters overlap an assistant span, so a token that merges a
    space before the reply with its first word (SentencePiece) is still learnt.
    """
    text = render_chat(tokenizer, conversation)
    chars = assistant_spans(tokenizer, conversation, text)
    # The template writes the special tokens (bos included) itself, as apply_chat_template(tokenize=True) does.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=cutoff + 1)
    ids, offsets = encoded["input_ids"][:cutoff], encoded["offset_mapping"][:cutoff]
    trained = [any(a < e and b > s for s, e in chars) for a, b in offsets]
    return TokenizedExample(tuple(ids), _runs(trained)), len(encoded["input_ids"]) > cutoff


def _runs(flags: list[bool]) -> tuple[tuple[int, int], ...]:
    """The half-open index ranges where ``flags`` is True."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return tuple(runs)


def generation_prompt_ids(tokenizer: Any, conversation: Conversation) -> list[int]:
    """The tokens a model continues to answer the chat's last assistant turn (for completions)."""
    last = max(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
    text = render_chat(tokenizer, conversation, last, generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
