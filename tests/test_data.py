"""Instruction data: reading the three forms, precise errors, templates, tokenisation, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import shared_path

from flora.common.basemodel import build_tokenizer
from flora.common.data import (
    IGNORE_INDEX,
    TEMPLATES,
    DataFormatError,
    data_folder,
    Example,
    TokenizedExample,
    collate,
    get_template,
    load_examples,
    split_examples,
    tokenize_examples,
)

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]
DOLLY = [
    {"instruction": "Who wrote it?", "context": "Hamlet is a play.", "response": "Shakespeare", "category": "qa"},
    {"instruction": "Name a colour.", "context": "", "response": "red", "category": "brainstorming"},
]
TEXT = [{"text": "Once upon a time."}, {"text": "The end."}]

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSay hi.\n\n### Response:\n"
)


def write_json(path: Path, records: object) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(params=["json", "jsonl"])
def writer(request):
    """Write records as a JSON array or as JSON lines (both under the same .json suffix)."""
    return write_json if request.param == "json" else write_jsonl


# --- the three forms ---------------------------------------------------------------------------


def test_alpaca_form_renders_the_standard_template(tmp_path: Path, writer) -> None:
    examples = load_examples(writer(tmp_path / "a.json", ALPACA))
    assert examples == [
        Example(ALPACA_PROMPT_WITH_INPUT, "5"),
        Example(ALPACA_PROMPT_NO_INPUT, "hi"),
    ]


def test_dolly_form_maps_context_to_input_and_ignores_extra_keys(tmp_path: Path, writer) -> None:
    examples = load_examples(writer(tmp_path / "d.json", DOLLY), template="plain")
    assert examples == [
        Example("Who wrote it?\nHamlet is a play.\n", "Shakespeare"),
        Example("Name a colour.\n", "red"),
    ]


def test_text_form_has_an_empty_prompt(tmp_path: Path, writer) -> None:
    examples = load_examples(writer(tmp_path / "t.json", TEXT))
    assert examples == [Example("", "Once upon a time."), Example("", "The end.")]


def test_alpaca_record_carrying_a_rendered_text_field_is_alpaca(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", [{**ALPACA[1], "text": "pre-rendered"}])
    assert load_examples(path) == [Example(ALPACA_PROMPT_NO_INPUT, "hi")]


def test_format_is_detected_by_content_not_suffix(tmp_path: Path) -> None:
    as_lines = write_jsonl(tmp_path / "lines.json", TEXT)
    as_array = write_json(tmp_path / "array.jsonl", TEXT)
    assert load_examples(as_lines) == load_examples(as_array)


def test_null_optional_input_counts_as_empty(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", [{"instruction": "Say hi.", "input": None, "output": "hi"}])
    assert load_examples(path) == [Example(ALPACA_PROMPT_NO_INPUT, "hi")]


def test_several_files_of_different_forms_load_in_order(tmp_path: Path) -> None:
    paths = [write_json(tmp_path / "a.json", ALPACA), write_jsonl(tmp_path / "t.jsonl", TEXT)]
    examples = load_examples(paths)
    assert [e.response for e in examples] == ["5", "hi", "Once upon a time.", "The end."]


@pytest.mark.shared
def test_real_dolly_shard_loads() -> None:
    examples = load_examples(shared_path("data", "dolly-10clients", "local_training_1.json"))
    assert len(examples) > 100
    assert all(e.prompt.startswith("Below is an instruction") for e in examples)


# --- malformed files ---------------------------------------------------------------------------


def error_for(path: Path) -> str:
    with pytest.raises(DataFormatError) as info:
        load_examples(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_missing_field_names_record_line_and_field(tmp_path: Path) -> None:
    records = [*ALPACA, {"instruction": "no output here", "input": ""}]
    message = error_for(write_jsonl(tmp_path / "a.jsonl", records))
    assert "record 3 (line 3)" in message and "'output'" in message and "alpaca" in message


def test_jsonl_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    assert "record 2 (line 3)" in error_for(path)


def test_mistyped_field_names_field_and_type(tmp_path: Path) -> None:
    records = [ALPACA[0], {"instruction": "Count.", "input": "", "output": 3}]
    message = error_for(write_json(tmp_path / "a.json", records))
    assert "record 2" in message and "'output'" in message and "int" in message


def test_null_required_field_is_rejected(tmp_path: Path) -> None:
    message = error_for(write_json(tmp_path / "a.json", [{"instruction": None, "output": "x"}]))
    assert "record 1" in message and "'instruction'" in message and "null" in message


def test_mixed_forms_in_one_file_are_rejected(tmp_path: Path) -> None:
    message = error_for(write_json(tmp_path / "mixed.json", [ALPACA[0], DOLLY[0]]))
    assert "record 2" in message and "'output'" in message and "alpaca form" in message


def test_record_of_no_form_lists_what_each_form_needs(tmp_path: Path) -> None:
    message = error_for(write_json(tmp_path / "x.json", [{"question": "?", "answer": "!"}]))
    assert "record 1" in message and "'output'" in message and "'response'" in message and "'text'" in message


def test_non_object_record_is_rejected(tmp_path: Path) -> None:
    message = error_for(write_jsonl(tmp_path / "x.jsonl", [TEXT[0], ["not", "an", "object"]]))
    assert "record 2 (line 2)" in message and "list" in message


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n" + '{"text": "unterminated\n')
    assert "line 2" in error_for(path)
    array = tmp_path / "bad.json"
    array.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    assert "line 3" in error_for(array)


@pytest.mark.parametrize(("content", "expected"), [("", "empty"), ("  \n\n", "empty"), ("[]", "no records")])
def test_empty_files_are_rejected(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "empty.json"
    path.write_text(content)
    assert expected in error_for(path)


def test_pretty_printed_object_is_explained(tmp_path: Path) -> None:
    path = write_json(tmp_path / "obj.json", {"data": TEXT})
    assert "JSON array or one JSON object per line" in error_for(path)


def test_data_format_error_is_a_value_error() -> None:
    assert issubclass(DataFormatError, ValueError)


# --- templates ---------------------------------------------------------------------------------


def test_template_registry_and_rendering() -> None:
    assert set(TEMPLATES) >= {"alpaca", "plain"}
    plain = get_template("plain")
    assert plain.render("Do it.", "now") == "Do it.\nnow\n"
    assert plain.render("Do it.") == "Do it.\n"


def test_custom_template_substitutes_values_as_data() -> None:
    template = get_template("Q: {instruction} [{input}] A:")
    assert template.render("what is {input}?", "x") == "Q: what is {input}? [x] A:"


@pytest.mark.parametrize(
    "spec", ["no fields at all", "{input} only", "{instruction.__class__}", "{instruction!r}", "{instruction:>9}", "{0}", "{"]
)
def test_bad_templates_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        get_template(spec)


# --- tokenisation and batching -----------------------------------------------------------------


def test_tokens_are_prompt_response_eos(tiny_tokenizer) -> None:
    [tokens] = tokenize_examples([Example("Hi ", "there")], tiny_tokenizer, cutoff=64)
    expected = tiny_tokenizer("Hi there")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert list(tokens.input_ids) == expected and tokens.trained is None and tokens.labelled == len(expected)


def test_cutoff_truncates_and_drops_eos(tiny_tokenizer) -> None:
    [long, short] = tokenize_examples([Example("x" * 50, "y" * 50), Example("", "ab")], tiny_tokenizer, cutoff=16)
    assert len(long) == 16 and long.input_ids[-1] != tiny_tokenizer.eos_token_id
    assert len(short) == 4 and short.input_ids[-1] == tiny_tokenizer.eos_token_id  # bos a b eos


def test_mask_prompt_masks_exactly_the_prompt_tokens(tiny_tokenizer) -> None:
    example = Example("Question?\n", "Answer.")
    [masked] = tokenize_examples([example], tiny_tokenizer, cutoff=64, mask_prompt=True)
    prompt = len(tiny_tokenizer(example.prompt)["input_ids"])
    assert masked.trained == ((prompt, len(masked)),)
    labels = collate([masked])["labels"][0]
    assert (labels[:prompt] == IGNORE_INDEX).all()
    assert labels[prompt:].tolist() == list(masked.input_ids[prompt:])
    assert tiny_tokenizer.decode(labels[prompt:-1].tolist()) == "Answer."


def test_collate_right_pads_and_masks_padding() -> None:
    batch = collate([TokenizedExample.after_prompt((5, 6, 7), 1), TokenizedExample((8,))], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_tokenizer_without_pad_token_works() -> None:
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    data = tokenize_examples([Example("a", "b"), Example("", "longer text")], tokenizer, mask_prompt=True)
    batch = collate(data)
    assert batch["input_ids"].shape == (2, len(data[1]))
    assert batch["attention_mask"][0].sum() == len(data[0])


def test_pad_equal_to_eos_keeps_the_real_eos_trained(tiny_tokenizer) -> None:
    eos = tiny_tokenizer.eos_token_id
    data = tokenize_examples([Example("", "a"), Example("", "abcdef")], tiny_tokenizer)
    labels = collate(data, pad_id=eos)["labels"][0]
    assert labels[len(data[0]) - 1] == eos and (labels[len(data[0]) :] == IGNORE_INDEX).all()


@pytest.mark.shared
def test_real_tokenizer_without_pad_token() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))
    assert tokenizer.pad_token is None
    example = Example("Once upon a time", " there was a cat.")
    [tokens] = tokenize_examples([example], tokenizer, mask_prompt=True)
    assert tokens.input_ids[-1] == tokenizer.eos_token_id and 0 < tokens.trained[0][0] < len(tokens) - 1


# --- splitting ---------------------------------------------------------------------------------


def test_split_is_a_deterministic_partition() -> None:
    items = list(range(100))
    train, val = split_examples(items, 0.2, seed=7)
    assert len(val) == 20 and sorted(train + val) == items
    assert train == sorted(train) and val == sorted(val)  # input order kept
    assert split_examples(items, 0.2, seed=7) == (train, val)
    assert split_examples(items, 0.2, seed=8)[1] != val


def test_split_by_count_and_limits() -> None:
    assert len(split_examples(list(range(10)), 3)[1]) == 3
    assert split_examples(list(range(10)), 0) == (list(range(10)), [])
    assert len(split_examples(list(range(3)), 0.01)[1]) == 1  # a fraction keeps at least one
    for bad in (0.0, 1.0, 10, -1):
        with pytest.raises(ValueError):
            split_examples(list(range(10)), bad)
    with pytest.raises(TypeError):
        split_examples(list(range(10)), True)


def test_data_folder_lists_clients_naturally_and_sets_validation_apart(tmp_path):
    for name in ("client_10.json", "client_2.jsonl", "client_1.json", "validation.json", "notes.txt"):
        (tmp_path / name).write_text("[]")
    clients, validation = data_folder(tmp_path)
    assert [p.name for p in clients] == ["client_1.json", "client_2.jsonl", "client_10.json"]
    assert [p.name for p in validation] == ["validation.json"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .json/.jsonl/.csv/.tsv/.parquet client files"):
        data_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory"):
        data_folder(tmp_path / "missing")
