"""flora-client settings: layers, limits, TLS rules, hints, module overrides and the CLI."""

from __future__ import annotations

import json

import io
import logging
import stat

import pytest

from flora.client import cli
from flora.client.config import ENV_PREFIX, TRAIN_FIELDS, ClientSettings, is_loopback, split_address
from flora.client.local import ConfigError, load_base, tokenize_local, trained_modules, warn_rank_above_modules
from flora.client.progress import Progress
from flora.client.state import Identity, StateDir
from flora.client.trainer import TrainConfig
from flora.common.data import Example
from flora.common.settings import SettingsError, load_settings
from flora.v1 import run_pb2


@pytest.fixture(autouse=True)
def _no_global_process_state(monkeypatch):
    """cli.main configures the root logger and signal handlers: not inside the test process."""
    monkeypatch.setattr(cli, "configure_logging", lambda *args: None)
    monkeypatch.setattr(cli, "install_signal_handlers", lambda stop: None)


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n')
    return path


def settings(data_file, **values) -> ClientSettings:
    return ClientSettings(name="alice", data=[data_file], **values)


def test_every_training_field_comes_from_train_config():
    for name in TRAIN_FIELDS:
        assert ClientSettings.model_fields[name].description == TrainConfig.model_fields[name].description
    assert {"rank", "alpha", "rslora", "device", "max_steps", "epochs", "learning_rate", "seed"} <= set(TRAIN_FIELDS)


def test_flags_env_and_file_layer_with_the_client_prefix(tmp_path, data_file):
    config = tmp_path / "client.toml"
    config.write_text(f'name = "from-file"\ndata = ["{data_file}"]\nrank = 4\n')
    environ = {f"{ENV_PREFIX}RANK": "6", f"{ENV_PREFIX}TOKEN": "enrol-secret", f"{ENV_PREFIX}TARGET_MODULES": "q_proj, v_proj"}
    flags = vars(cli.build_parser().parse_args(["--server", "[::1]:7000", "--name", "bob", "--alpha", "3"]))
    flags.pop("config"), flags.pop("print_config")
    loaded = load_settings(ClientSettings, config_file=config, env_prefix=ENV_PREFIX, flags=flags, environ=environ)
    assert (loaded.name, loaded.rank, loaded.alpha, loaded.server) == ("bob", 6, 3.0, "[::1]:7000")
    assert loaded.token.get_secret_value() == "enrol-secret"
    assert loaded.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("values", "field", "limit"),
    [
        ({"server": "localhost"}, "server", "HOST:PORT"),
        ({"server": "host:70000"}, "server", "1..65535"),
        ({"name": "a/b"}, "name", "A-Za-z0-9"),
        ({"rank": 0}, "rank", "greater than or equal to 1"),
        ({"alpha": -1}, "alpha", "greater than 0"),
        ({"device": "tpu"}, "device", "auto|cpu|cuda"),
        ({"backoff_initial": 5, "backoff_max": 1}, "backoff_max", "backoff_initial"),
        ({"target_modules": []}, "target_modules", "at least one module"),
    ],
)
def test_invalid_values_name_the_field_and_limit(data_file, values, field, limit):
    base = {"name": "alice", "data": [str(data_file)]}
    with pytest.raises(SettingsError) as err:
        load_settings(ClientSettings, flags={**base, **values}, environ={})
    assert field in str(err.value) and limit in str(err.value)


def test_missing_name_and_data_are_reported_with_their_flags(tmp_path):
    with pytest.raises(SettingsError) as err:
        load_settings(ClientSettings, env_prefix=ENV_PREFIX, environ={})
    assert "--name" in str(err.value) and "--data" in str(err.value)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match="data"):
        load_settings(ClientSettings, flags={"name": "a", "data": str(tmp_path / "nope.json")}, environ={})


def test_alpha_defaults_to_twice_the_rank(data_file):
    config = settings(data_file, rank=4).train_config(["m"], run_pb2.TrainingHints(), 10, seed=1)
    assert config.lora_alpha == 8.0 and config.scaling == 2.0


def test_server_hints_override_own_settings(data_file):
    own = settings(data_file, batch_size=4, learning_rate=1e-3, max_steps=7, grad_accum=1)
    assert own.train_config(["m"], run_pb2.TrainingHints(), 10, seed=0).max_steps == 7
    hinted = own.train_config(["m"], run_pb2.TrainingHints(max_steps=3, learning_rate=0.01, batch_size=2), 10, seed=5)
    assert (hinted.max_steps, hinted.learning_rate, hinted.batch_size, hinted.seed) == (3, pytest.approx(0.01), 2, 5)
    assert hinted.target_modules == ("m",)
    # 1.5 epochs of 10 examples in batches of 4: 3 batches per epoch -> 5 steps (rounded up).
    assert own.train_config(["m"], run_pb2.TrainingHints(local_epochs=1.5), 10, seed=0).max_steps == 5
    whole = own.train_config(["m"], run_pb2.TrainingHints(local_epochs=2.0), 10, seed=0)
    assert (whole.epochs, whole.max_steps) == (2, 0)


def test_tls_rules(tmp_path, data_file):
    pem = tmp_path / "x.pem"
    pem.write_text("not checked here")
    assert not settings(data_file).uses_tls  # loopback, no CA: plaintext
    assert settings(data_file, server="flora.example.org:443").uses_tls  # off loopback: TLS, system roots
    assert not settings(data_file, server="10.0.0.5:50051", insecure=True).uses_tls
    assert settings(data_file, tls_ca=pem).uses_tls
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        settings(data_file, tls_cert=pem)
    with pytest.raises(ValueError, match="insecure contradicts"):
        settings(data_file, tls_ca=pem, insecure=True)


def test_address_helpers():
    assert split_address("[::1]:50051") == ("::1", 50051)
    assert is_loopback("::1") and is_loopback("127.0.0.2") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("example.org")


def test_target_module_override_selects_a_subset(data_file):
    spec = run_pb2.RunSpec(
        method=run_pb2.AGGREGATION_METHOD_FLORA,
        target_modules=[run_pb2.TargetModule(name=f"model.layers.{i}.self_attn.{p}") for i in range(2) for p in ("q_proj", "v_proj")],
    )
    assert len(trained_modules(settings(data_file), spec)) == 4
    assert trained_modules(settings(data_file, target_modules=["q_proj"]), spec) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    ]
    with pytest.raises(ConfigError, match="'k_proj' matches none"):
        trained_modules(settings(data_file, target_modules=["k_proj"]), spec)
    spec.method = run_pb2.AGGREGATION_METHOD_FEDIT
    with pytest.raises(ConfigError, match="not possible in fedit runs"):
        trained_modules(settings(data_file, target_modules=["q_proj"]), spec)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_blames_the_device_not_the_model(data_file):
    settings = ClientSettings(name="a", data=[data_file], device="cuda")
    with pytest.raises(ConfigError) as error:
        load_base(settings, "flora-tiny-llama")
    assert str(error.value).startswith("--device: device 'cuda' requested but CUDA is not available")
    assert "--base-model" not in str(error.value) and "--device auto" in str(error.value)


def test_a_rank_above_a_modules_size_is_warned_about_with_the_rank_to_use(caplog):
    spec = run_pb2.RunSpec(target_modules=[run_pb2.TargetModule(name="big", out_features=64, in_features=64),
                                           run_pb2.TargetModule(name="small", out_features=8, in_features=64)])
    with caplog.at_level(logging.WARNING, logger="flora.client.local"):
        assert warn_rank_above_modules(8, spec) == [] and not caplog.records
        assert warn_rank_above_modules(16, spec) == ["small"]
    assert "event=rank_above_module_size rank=16 modules=1 smallest=8 first=small" in caplog.text
    assert "--rank 8 or lower" in caplog.text


def test_cli_print_config_and_exit_codes(tmp_path, data_file, capsys, monkeypatch):
    monkeypatch.setenv(f"{ENV_PREFIX}TOKEN", "secret-enrolment")
    assert cli.main(["--print-config", "--name", "alice", "--data", str(data_file), "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert 'name = "alice"' in out and "rank = 4" in out and "secret-enrolment" not in out
    assert cli.main(["--name", "alice", "--data", str(data_file), "--rank", "-1"]) == 2
    assert "rank" in capsys.readouterr().err


def test_cli_bad_data_exits_2_with_the_record_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x", "output": "y"}, {"question": "z"}]')
    status = cli.main(["--name", "alice", "--data", str(bad), "--state-dir", str(tmp_path / "s"), "--progress", "off"])
    assert status == 2
    assert "record 2" in capsys.readouterr().err


CHAT_RECORD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize(("records", "flags", "message"), [
    ([{"instruction": "x", "output": "y"}, {"instruction": "z"}], [],
     "bad.jsonl: record 2 (line 2): field 'output': is missing: the file's records are in alpaca form (as its first record)"),
    ([CHAT_RECORD, {"messages": [{"role": "bot", "content": "?"}]}], ["--template", "chat"],
     "bad.jsonl: record 2 (line 2): field 'messages[0].role': must be one of ['assistant', 'system', 'user'], got 'bot'"),
    ([CHAT_RECORD], [], "bad.jsonl: its records are chats (chat form): they are rendered by the model's own chat "
     "template, use --template chat"),
    ([{"question": "q", "answer": "a"}, {"question": "q"}], ["--field", "instruction=question", "--field", "output=answer"],
     "bad.jsonl: record 2 (line 2): field 'answer': is missing (read as 'output' by --field output=answer)"),
    ([{"instruction": "x", "output": "y"}], ["--field", "instruction"], "--field 'instruction': expected FORM_KEY=YOUR_KEY"),
    ([{"instruction": "x", "output": 3}], ["--data-format", "alpaca"], "bad.jsonl: record 1 (line 1): field 'output': must be a string, got int"),
], ids=["missing-field", "chat-role", "chat-without-template", "field-mapping", "field-spec", "mistyped"])
def test_cli_bad_data_exits_2_naming_file_record_and_field(tmp_path, capsys, records, flags, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    status = cli.main(["--name", "alice", "--data", str(bad), "--state-dir", str(tmp_path / "s"), "--progress", "off", *flags])
    assert status == 2
    assert message in capsys.readouterr().err


def test_cli_unreadable_sources_exit_2(tmp_path, capsys):
    assert cli.main(["--name", "alice", "--data", str(tmp_path / "absent.parquet"), "--progress", "off"]) == 2
    assert "absent.parquet: no such file or folder" in capsys.readouterr().err
    assert cli.main(["--name", "alice", "--data", str(tmp_path / "a.jsonl"), "--data-format", "qa", "--progress", "off"]) == 2
    assert "data_format" in capsys.readouterr().err


def test_cli_state_dir_of_another_client_exits_2(tmp_path, data_file, capsys):
    state = StateDir(tmp_path / "s")
    state.save_identity(Identity(run_id="r", client_id="c", token="t", server="localhost:1", name="bob"))
    assert stat.S_IMODE((tmp_path / "s" / "identity.json").stat().st_mode) == 0o600
    state.close()
    status = cli.main(["--name", "alice", "--data", str(data_file), "--state-dir", str(tmp_path / "s"),
                       "--server", "127.0.0.1:9", "--progress", "off", "--rpc-timeout", "0.5"])
    assert status == 2
    assert "belongs to client 'bob'" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_bars_on_a_terminal_and_log_lines_elsewhere(caplog):
    terminal = _Terminal()
    with Progress("auto", terminal).bar("download v1", 1000, unit="B") as bar:
        bar.update(600)
    assert "download v1" in terminal.getvalue()
    pipe = io.StringIO()
    progress = Progress("auto", pipe)
    with caplog.at_level(logging.INFO, logger="flora.client.progress"):
        with progress.bar("train round 1", 3, unit="step") as bar:
            bar.update(1, loss=1.5)
    assert pipe.getvalue() == ""
    assert "event=progress_end what=train round 1 done=1 total=3 unit=step" in caplog.text and "loss=1.5" in caplog.text
    assert Progress("on", pipe).terminal and not Progress("off", terminal).terminal


def test_examples_whose_prompt_fills_the_cutoff_are_reported(data_file, tiny_tokenizer, caplog):
    long_prompt = Example(prompt="x" * 100, response="yes")
    short = Example(prompt="hi", response="there")
    with caplog.at_level(logging.WARNING, logger="flora.client.local"):
        tokenize_local([long_prompt, short], tiny_tokenizer, settings(data_file, cutoff=32, mask_prompt=True))
    assert "event=examples_without_loss count=1 of=2 cutoff=32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flora.client.local"):
        tokenize_local([long_prompt, short], tiny_tokenizer, settings(data_file, cutoff=32, mask_prompt=False))
    assert "examples_without_loss" not in caplog.text
