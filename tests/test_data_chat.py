"""--template chat: the tokenizer's own chat template, loss on exactly the assistant tokens.

The masks are checked token by token against renderings built piece by piece here: the
built-in tokenizer is byte-level, so a text's tokens are the concatenation of its pieces' tokens
and every piece's tokens are known to be the assistant's or not.
"""

from __future__ import annotations

import pytest

from flora.common.basemodel import build_tokenizer
from flora.common.data import (
    IGNORE_INDEX,
    Conversation,
    Example,
    Message,
    collate,
    prompt_ids,
    tokenize_examples,
)
from flora.common.evaluate import evaluate_loss

CHAT = Conversation((
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello!"),
    Message("user", "2+2?"),
    Message("assistant", "4"),
))

# Qwen 2.5's ChatML layout and Llama 3's headers, reduced to what decides the mask; the Qwen 3
# variant writes an empty think block into the last assistant turn only, as Qwen 3 does.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN3 = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def builtin_pieces(chat: Conversation) -> list[tuple[str, bool]]:
    """The built-in template's rendering of ``chat`` as (piece, learnt) pairs."""
    pieces = [("<s>", False)]
    for m in chat.messages:
        learnt = m.role == "assistant"
        pieces += [(f"<|{m.role}|>\n", False), (m.content + "</s>", learnt)]
    return pieces


def chatml_pieces(chat: Conversation, think: bool) -> list[tuple[str, bool]]:
    pieces = []
    for k, m in enumerate(chat.messages):
        learnt = m.role == "assistant"
        pieces.append((f"<|im_start|>{m.role}\n", False))
        if think and learnt and k == len(chat.messages) - 1:
            pieces.append(("<think>\n\n</think>\n\n", True))  # the model must write it: it follows the prompt
        pieces += [(m.content + "<|im_end|>", learnt), ("\n", False)]
    return pieces


def llama3_pieces(chat: Conversation) -> list[tuple[str, bool]]:
    pieces = [("<|begin_of_text|>", False)]
    for m in chat.messages:
        pieces += [(f"<|start_header_id|>{m.role}<|end_header_id|>\n\n", False), (m.content + "<|eot_id|>", m.role == "assistant")]
    return pieces


def expected_tokens(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    ids, learnt = [], []
    for text, flag in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        learnt += [flag] * len(piece)
    return ids, learnt


def learnt_flags(tokens) -> list[bool]:
    flags = [False] * len(tokens)
    for start, end in tokens.spans():
        flags[start:end] = [True] * (end - start)
    return flags


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def family_tokenizer():
    """The built-in tokenizer with the special tokens of real instruct families added."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tokenizer


def test_the_builtin_template_renders_and_round_trips(tokenizer, tmp_path) -> None:
    text = tokenizer.apply_chat_template(CHAT.as_dicts(), tokenize=False)
    assert text == "<s><|system|>\nBe brief.</s><|user|>\nHi</s><|assistant|>\nHello!</s><|user|>\n2+2?</s><|assistant|>\n4</s>"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template(CHAT.as_dicts(4), tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("2+2?</s><|assistant|>\n")
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(CHAT.as_dicts(), tokenize=False) == text


def test_builtin_mask_covers_exactly_every_assistant_turn(tokenizer) -> None:
    [tokens] = tokenize_examples([CHAT], tokenizer, cutoff=512)
    ids, learnt = expected_tokens(tokenizer, builtin_pieces(CHAT))
    assert list(tokens.input_ids) == ids
    assert learnt_flags(tokens) == learnt
    assert [tokenizer.decode(tokens.input_ids[a:b]) for a, b in tokens.spans()] == ["Hello!</s>", "4</s>"]
    labels = collate([tokens])["labels"][0].tolist()
    assert labels == [i if flag else IGNORE_INDEX for i, flag in zip(ids, learnt)]


@pytest.mark.parametrize(("template", "pieces"), [
    (CHATML, lambda chat: chatml_pieces(chat, think=False)),
    (QWEN3, lambda chat: chatml_pieces(chat, think=True)),
    (LLAMA3, llama3_pieces),
], ids=["qwen2.5-chatml", "qwen3-think", "llama3"])
def test_family_templates_without_generation_markers_mask_exactly(family_tokenizer, template, pieces) -> None:
    family_tokenizer.chat_template = template
    [tokens] = tokenize_examples([CHAT], family_tokenizer, cutoff=512)
    ids, learnt = expected_tokens(family_tokenizer, pieces(CHAT))
    assert list(tokens.input_ids) == ids
    assert learnt_flags(tokens) == learnt


def test_generation_prompt_is_the_template_up_to_the_last_reply(tokenizer) -> None:
    ids = prompt_ids(tokenizer, CHAT)
    assert tokenizer.decode(ids).endswith("<|user|>\n2+2?</s><|assistant|>\n")
    assert prompt_ids(tokenizer, Example("Q: ", "A")) == tokenizer("Q: ")["input_ids"]


def test_a_tokenizer_without_chat_template_gets_the_fix_named(tokenizer) -> None:
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; use an instruct model .* or an instruction template such as --template alpaca"):
        tokenize_examples([CHAT], bare)


def test_a_template_that_refuses_a_chat_names_the_record(tokenizer) -> None:
    strict = build_tokenizer()
    strict.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    chat = Conversation(CHAT.messages, origin="data.jsonl: record 7")
    with pytest.raises(ValueError, match="data.jsonl: record 7: the chat template of .* refused the chat: no system role"):
        tokenize_examples([chat], strict)


def test_a_cut_chat_keeps_the_assistant_tokens_inside_the_cutoff(tokenizer) -> None:
    [full] = tokenize_examples([CHAT], tokenizer, cutoff=512)
    cutoff = full.spans()[0][0] + 3  # three tokens into the first reply
    [cut] = tokenize_examples([CHAT], tokenizer, cutoff=cutoff)
    assert cut.input_ids == full.input_ids[:cutoff] and cut.spans() == ((cutoff - 3, cutoff),)


def test_chat_and_plain_examples_mix_and_evaluate(tiny_model, tiny_tokenizer) -> None:
    data = tokenize_examples([CHAT, Example("Q: ", "A")], tiny_tokenizer, cutoff=256)
    assert data[1].trained is None and data[0].labelled == len("Hello!") + 1 + len("4") + 1
    loss = evaluate_loss(tiny_model, data)
    assert loss > 0 and loss == loss  # finite, from the assistant tokens and the plain example only


@pytest.mark.shared
def test_sentencepiece_reply_tokens_that_carry_the_space_before_them_are_learnt() -> None:
    """A Llama-2-style template on a real SentencePiece tokenizer: '▁there' holds the space that
    precedes the reply, and still carries loss; the '[/INST]' before it does not."""
    from transformers import AutoTokenizer

    from conftest import shared_path

    tokenizer = AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    chat = Conversation((Message("user", "Once upon a time"), Message("assistant", "there was a cat."),
                         Message("user", "And then?"), Message("assistant", "It slept.")))
    [tokens] = tokenize_examples([chat], tokenizer, cutoff=256)
    pieces = tokenizer.convert_ids_to_tokens(list(tokens.input_ids))
    assert [tokenizer.decode(tokens.input_ids[a:b]) for a, b in tokens.spans()] == ["there was a cat.</s>", "It slept.</s>"]
    assert [pieces[a] for a, _ in tokens.spans()] == ["▁there", "▁I"] and all(pieces[a - 1] == "]" for a, _ in tokens.spans())
