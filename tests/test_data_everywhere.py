"""The server's validation_data, flora-sim and flora-demo read data as the client does: the same
forms and sources through ``load_examples``, and the same options passed through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flora.common.data import Conversation, Message, load_examples, tokenize_examples
from flora.server.aggregator import Aggregator
from flora.server.config import ServerSettings
from flora.server.inputs import ConfigurationError
from flora.server.layout import Layout
from flora.sim.cli import main as sim_main
from flora.sim.federation import DataOptions, load_federation

datasets = pytest.importorskip("datasets")

CHATS = [
    {"messages": [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": f"Colour {i}?"},
                  {"role": "assistant", "content": colour}]}
    for i, colour in enumerate(["red", "blue", "green", "white", "black", "grey", "pink", "gold"])
]
SHAREGPT = [{"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                               for m in record["messages"]]} for record in CHATS]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def chat_folder(tmp_path: Path) -> Path:
    """Two clients' chats, one as JSONL and one as ShareGPT parquet, and a validation file."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "client_1.jsonl", CHATS)
    datasets.Dataset.from_list(SHAREGPT).to_parquet(str(folder / "client_2.parquet"))
    write_jsonl(folder / "validation.jsonl", CHATS[:2])
    return folder


def test_server_validation_data_reads_chats_and_parquet_like_a_client(tmp_path: Path, chat_folder: Path, tiny_tokenizer) -> None:
    settings = ServerSettings(state_dir=tmp_path / "state", validation_data=[chat_folder / "client_2.parquet"],
                              validation_template="chat", validation_cutoff=128)
    aggregator = Aggregator(settings, Layout(tmp_path / "state"))
    twin = tokenize_examples(load_examples(chat_folder / "client_1.jsonl", "chat"), tiny_tokenizer, cutoff=128)
    assert aggregator.validation == twin
    assert all(0 < e.labelled < len(e) for e in aggregator.validation)  # assistant turns only
    assert aggregator.evaluate() > 0


def test_server_validation_data_errors_name_file_record_and_field(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "?", "answer": "!"}, {"question": "?"}])
    settings = ServerSettings(state_dir=tmp_path / "state", validation_data=[bad],
                              validation_field=["instruction=question", "output=answer"])
    with pytest.raises(ConfigurationError, match=r"validation_data: .*bad.jsonl: record 2 \(line 2\): field 'answer': is missing"):
        Aggregator(settings, Layout(tmp_path / "state"))


def test_sim_reads_every_form_of_a_folder_like_a_client(chat_folder: Path, tiny_tokenizer) -> None:
    options = DataOptions(template="chat", cutoff=128)
    federation = load_federation([chat_folder / "client_1.jsonl", chat_folder / "client_2.parquet"], tiny_tokenizer,
                                 options, eval_file=chat_folder / "validation.jsonl")
    twin = tokenize_examples(load_examples(chat_folder / "client_1.jsonl", "chat"), tiny_tokenizer, cutoff=128)
    assert [client.train for client in federation.clients] == [twin, twin]
    assert federation.validation == twin[:2] and federation.fully_masked == 0


def test_sim_cli_trains_on_chat_data_with_mapped_fields(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for k in (1, 2):
        write_jsonl(folder / f"client_{k}.jsonl", [{"q": f"Colour {i}?", "a": "red"} for i in range(8)])
    sim_main(["--data-dir", str(folder), "--template", "chat", "--field", "instruction=q", "--field", "output=a",
              "--data-format", "alpaca", "--ranks", "2", "--rounds", "1", "--local-steps", "1", "--cutoff", "48",
              "--method", "flora", "--out", str(tmp_path / "out")])
    assert "2 clients (ranks [2, 2])" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        sim_main(["--data-dir", str(folder), "--ranks", "2", "--field", "instruction=q", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "client_1.jsonl: record 1 (line 1): fits no known form" in capsys.readouterr().err


def test_demo_passes_the_data_options_to_clients_and_server(tmp_path: Path) -> None:
    from flora.demo.cli import _client_args, _server_args, parse_args
    from flora.demo.workspace import prepare

    args = parse_args(["--template", "chat", "--data-format", "sharegpt", "--field", "conversations=dialog"])
    workspace = prepare(tmp_path / "run")
    client = _client_args(1, "c", 4, tmp_path / "c.jsonl", workspace, args)
    server = _server_args(args, workspace, [tmp_path / "v.jsonl"], [4])
    assert {"--template=chat", "--data-format=sharegpt", "--field=conversations=dialog"} <= set(client)
    assert {"--validation-template=chat", "--validation-data-format=sharegpt",
            "--validation-field=conversations=dialog"} <= set(server)


def test_demo_completions_prompt_a_chat_through_its_template(tmp_path: Path, tiny_model_dir: str) -> None:
    from flora.common.basemodel import load_model, load_tokenizer
    from flora.common.data import ReadOptions, prompt_ids
    from flora.demo.completions import _question, complete, held_out_prompts

    validation = write_jsonl(tmp_path / "validation.jsonl", CHATS[:2])
    items = held_out_prompts([validation], per_task=2, options=ReadOptions(template="chat"))
    assert [(item.question, item.expected) for item in items] == [("Colour 0?", "red"), ("Colour 1?", "blue")]
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    assert prompt_ids(tokenizer, items[0].example) != tokenizer(items[0].question)["input_ids"]  # the chat template's
    batch = complete(model, tokenizer, [item.example for item in items], max_new_tokens=2, max_prompt_tokens=256)
    # Greedy decoding is deterministic, and a left-padded batch answers as each prompt alone does.
    assert batch == [complete(model, tokenizer, [item.example], 2, 256)[0] for item in items]
    assert load_examples(validation, "chat")[0] == Conversation(tuple(Message(**m) for m in CHATS[0]["messages"]))
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    [instruction] = load_examples(alpaca, "chat")
    assert _question({}, instruction) == "Add. / 2 and 3"  # one table line, as the Alpaca prompt's is  # one table line, as the Alpaca prompt's is
