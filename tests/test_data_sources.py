"""Data in the forms people keep: every form and source loads to the same examples as its JSONL
twin; forced forms, column mapping and each bad input's precise message (file, record, field)."""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path

import pytest

from flora.common.data import (
    Conversation,
    DataFormatError,
    Example,
    Message,
    data_folder,
    load_examples,
    tokenize_examples,
)
from flora.common.data.readers import check_source

datasets = pytest.importorskip("datasets")

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]
CHAT = [
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]},
]
SHAREGPT = [
    {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                       for m in record["messages"]]}
    for record in CHAT
]
CHAT_EXAMPLES = [
    Conversation(tuple(Message(m["role"], m["content"]) for m in record["messages"])) for record in CHAT
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def error_for(source, *args, **kwargs) -> str:
    with pytest.raises(DataFormatError) as info:
        load_examples(source, *args, **kwargs)
    return str(info.value)


# --- forms -------------------------------------------------------------------------------------


def test_chat_and_sharegpt_load_as_the_same_conversations(tmp_path: Path) -> None:
    chat = load_examples(write_jsonl(tmp_path / "chat.jsonl", CHAT), "chat")
    assert chat == CHAT_EXAMPLES
    assert load_examples(write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT), "chat") == chat
    assert chat[0].origin == f"{tmp_path / 'chat.jsonl'}: record 1"


def test_instruction_and_completion_records_become_one_exchange_under_the_chat_template(tmp_path: Path) -> None:
    assert load_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA), "chat") == [
        Conversation((Message("user", "Add the numbers.\n\n2 and 3"), Message("assistant", "5"))),
        Conversation((Message("user", "Say hi."), Message("assistant", "hi"))),
    ]
    pairs = [{"prompt": "Q: 1+1\nA:", "completion": " 2"}]
    path = write_jsonl(tmp_path / "pc.jsonl", pairs)
    assert load_examples(path) == [Example("Q: 1+1\nA:", " 2")]  # verbatim, no template around it
    assert load_examples(path, "chat") == [Conversation((Message("user", "Q: 1+1\nA:"), Message("assistant", " 2")))]


def test_text_is_never_templated(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])
    assert load_examples(path) == load_examples(path, "chat") == [Example("", "Once upon a time.")]


def test_data_format_forces_a_form(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{**ALPACA[1], "text": "pre-rendered"}])
    assert load_examples(path, data_format="text") == [Example("", "pre-rendered")]
    message = error_for(path, data_format="dolly")
    assert "record 1 (line 1): field 'response': is missing" in message and "--data-format dolly" in message


def test_field_mapping_reads_other_column_names(tmp_path: Path) -> None:
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in ALPACA]
    path = write_jsonl(tmp_path / "qa.jsonl", renamed)
    twin = load_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert load_examples(path, fields=["instruction=question", "input=context", "output=answer"]) == twin
    message = error_for(write_jsonl(tmp_path / "gap.jsonl", [renamed[0], {"question": "?"}]),
                        fields=["instruction=question", "output=answer"])
    assert message.endswith("gap.jsonl: record 2 (line 2): field 'answer': is missing (read as 'output' by --field output=answer)")


@pytest.mark.parametrize(("spec", "expected"), [
    ("instruction", "expected FORM_KEY=YOUR_KEY"), ("question=instruction", "'question' is no form's key"),
])
def test_bad_field_specs_are_refused(tmp_path: Path, spec: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        load_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA), fields=[spec])


@pytest.mark.parametrize(("record", "field", "problem"), [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, "messages[1].role",
     "must be one of ['assistant', 'system', 'user'], got 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "messages[1].content",
     "must be a string, got null"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "has no assistant turn to learn from"),
    ({"messages": "hi"}, "messages", "must be a non-empty list of turns, got str"),
    ({"conversations": [{"from": "human", "value": "x"}, "gpt: y"]}, "conversations[1]", "must be an object"),
])
def test_bad_chat_records_name_record_and_field(tmp_path: Path, record: dict, field: str, problem: str) -> None:
    first = SHAREGPT[1] if "conversations" in record else CHAT[1]
    path = write_jsonl(tmp_path / "c.jsonl", [first, record])
    assert f"c.jsonl: record 2 (line 2): field {field!r}: {problem}" in error_for(path, "chat")


def test_chat_records_need_the_chat_template(tmp_path: Path) -> None:
    message = error_for(write_jsonl(tmp_path / "c.jsonl", CHAT))
    assert "c.jsonl: its records are chats (chat form)" in message and "--template chat" in message


# --- sources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("records", [ALPACA, CHAT], ids=["alpaca", "chat"])
def test_parquet_and_save_to_disk_load_like_their_jsonl_twin(tmp_path: Path, records: list) -> None:
    twin = load_examples(write_jsonl(tmp_path / "twin.jsonl", records), "chat")
    dataset = datasets.Dataset.from_list(records)
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    dataset.to_parquet(str(tmp_path / "no-suffix"))  # recognised by content, not refused as "not UTF-8"
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "splits"))
    for source in ("data.parquet", "no-suffix", "saved", "splits", "splits:train"):
        assert load_examples(tmp_path / source if ":" not in source else f"{tmp_path}/{source}", "chat") == twin, source
    assert load_examples(f"{tmp_path}/splits:test", "chat") == twin[:1]


def test_csv_cells_are_text_and_load_like_the_jsonl_twin(tmp_path: Path) -> None:
    records = [*ALPACA, {"instruction": "Count.", "input": "", "output": "42"}]
    twin = load_examples(write_jsonl(tmp_path / "twin.jsonl", records))
    csv_path = tmp_path / "data.csv"
    datasets.Dataset.from_list(records).to_csv(str(csv_path), index=False)
    assert load_examples(csv_path) == twin  # "42" stays a string, the empty input stays ""
    tsv = tmp_path / "data.tsv"
    tsv.write_text("instruction\toutput\nSay hi.\thi\n")
    assert load_examples(tsv) == [twin[1]]


def test_a_data_set_in_the_local_hugging_face_cache_loads_offline(tmp_path: Path, monkeypatch) -> None:
    from datasets.packaged_modules.generator.generator import Generator

    cache = tmp_path / "hf" / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    builder = Generator(cache_dir=str(cache), dataset_name="mini_alpaca", repo_id="acme/mini_alpaca",
                        generator=lambda: iter(ALPACA), hash="0" * 16, config_id="default")
    builder.download_and_prepare()  # the layout load_dataset leaves after a download
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as outside the tests: flora forces it per call
    twin = load_examples(write_jsonl(tmp_path / "twin.jsonl", ALPACA))
    assert load_examples("acme/mini_alpaca") == load_examples("acme/mini_alpaca:train") == twin
    assert datasets.config.HF_HUB_OFFLINE is False  # restored after the call
    message = error_for("acme/absent")
    assert "acme/absent: no such file or folder, nor a data set 'acme/absent' in the local Hugging Face cache" in message
    assert 'acme/mini_alpaca:test: Unknown split "test"' in error_for("acme/mini_alpaca:test")


def test_sources_that_do_not_exist_are_named(tmp_path: Path) -> None:
    assert error_for(tmp_path / "absent.jsonl").endswith("absent.jsonl: no such file or folder")
    with pytest.raises(ValueError, match="no such file or folder"):
        check_source(str(tmp_path / "absent.parquet"))
    assert check_source("acme/some_data:train") == "acme/some_data:train"  # resolved from the cache later
    (tmp_path / "plain_folder").mkdir()
    assert "not one written by datasets' save_to_disk" in error_for(tmp_path / "plain_folder")


def test_corrupt_parquet_and_folders_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    assert "bad.parquet: cannot be read as parquet" in error_for(path)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{not json")
    assert "saved: cannot be read as a save_to_disk folder" in error_for(tmp_path / "saved")


def test_without_the_datasets_extra_the_error_gives_the_pip_command(tmp_path: Path, monkeypatch) -> None:
    datasets.Dataset.from_list(ALPACA).to_parquet(str(tmp_path / "a.parquet"))
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    message = error_for(tmp_path / "a.parquet")
    assert message.endswith("a.parquet: reading parquet files needs the optional datasets package: "
                            "pip install 'flora-fl[datasets]'")
    assert load_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA))  # JSON needs no extra


def test_data_folders_list_every_readable_suffix(tmp_path: Path) -> None:
    for name in ("client_1.jsonl", "client_2.parquet", "client_3.csv", "validation.parquet", "notes.txt"):
        (tmp_path / name).write_text("")
    clients, validation = data_folder(tmp_path)
    assert [p.name for p in clients] == ["client_1.jsonl", "client_2.parquet", "client_3.csv"]
    assert [p.name for p in validation] == ["validation.parquet"]


def test_records_longer_than_the_cutoff_are_truncated_and_counted(tmp_path: Path, tiny_tokenizer, caplog) -> None:
    examples = [Example("", "x" * 40), Example("", "short"), *CHAT_EXAMPLES]
    with caplog.at_level(logging.WARNING, logger="flora.common.data"):
        tokens = tokenize_examples(examples, tiny_tokenizer, cutoff=16)
    assert [len(t) for t in tokens] == [16, 7, 16, 16]
    assert "event=examples_truncated count=3 of=4 cutoff=16" in caplog.text
