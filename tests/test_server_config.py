"""flora-server settings: defaults, limits, layering, and the refusals that protect a deployment."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest
import torch

from flora.common.settings import SettingsError, load_settings
from flora.server.cli import build_parser, main
from flora.server.config import ENV_PREFIX, ServerSettings, is_loopback
from harness import running_server


def settings_from(argv: list[str], environ: dict[str, str] | None = None, config=None) -> ServerSettings:
    flags = vars(build_parser().parse_args(argv))
    flags.pop("config"), flags.pop("print_config")
    return load_settings(ServerSettings, config_file=config, env_prefix=ENV_PREFIX, flags=flags, environ=environ or {})


def test_defaults_are_valid_and_safe():
    settings = settings_from([])
    assert (settings.host, settings.port, settings.method, settings.min_clients) == ("127.0.0.1", 50051, "flora-warm", 2)
    assert settings.enrollment_token is None and settings.tls_cert is None
    assert settings.required_scaling == 0.0 and settings.global_lora_rank == 0


def test_downlink_settings_become_the_policy():
    policy = settings_from(["--downlink-energy", "0.95", "--downlink-max-rank", "16", "--downlink-dtype", "bfloat16"]).downlink_policy
    assert (policy.energy, policy.max_rank, policy.dtype, policy.lossy) == (0.95, 16, torch.bfloat16, True)
    assert not settings_from([]).downlink_policy.lossy  # exact by default


def test_required_flags_exist_with_their_names():
    settings = settings_from(["--host", "localhost", "--port", "0", "--state-dir", "/tmp/s", "--base-model", "m",
                              "--rounds", "7", "--min-clients", "3", "--method", "zeropad"])
    chosen = (settings.port, str(settings.state_dir), settings.base_model, settings.rounds, settings.min_clients)
    assert chosen == (0, "/tmp/s", "m", 7, 3)
    assert settings.method == "zeropad" and settings.global_lora_rank == 8 and settings.required_scaling == 2.0


def test_file_environment_and_flags_layer(tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("rounds: 4\nclients_per_round: 0.5\nmethod: fedit\ntarget_modules: [v_proj, q_proj]\n")
    environ = {"FLORA_ROUNDS": "6", "FLORA_ENROLLMENT_TOKEN": "enrol-0123456789abcdef"}
    settings = settings_from(["--min-clients", "1"], environ, config)
    assert (settings.rounds, settings.min_clients, settings.clients_per_round) == (6, 1, "0.5")
    assert settings.target_modules == ["q_proj", "v_proj"]
    assert settings.enrollment_token.get_secret_value() == "enrol-0123456789abcdef"
    assert settings.selection.size(10) == 5


def test_toml_numbers_are_accepted_for_clients_per_round(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text("clients_per_round = 3\n")
    assert settings_from([], config=config).selection.size(10) == 3


@pytest.mark.parametrize(
    ("argv", "field", "message"),
    [
        (["--host", "0.0.0.0"], "host", "not a loopback address and TLS is off"),
        (["--tls-key", "k.pem"], "tls_key", "given together"),
        (["--tls-client-ca", "ca.pem"], "tls_client_ca", "needs tls_cert"),
        (["--long-poll-s", "120"], "client_timeout_s", "must exceed long_poll_s"),
        (["--method", "fedit", "--lora-rank", "64", "--max-rank", "32"], "lora_rank", "must not exceed max_rank"),
        (["--clients-per-round", "1.5"], "clients_per_round", "fraction in (0, 1]"),
        (["--rounds", "0"], "rounds", "greater than or equal to 1"),
        (["--quorum", "0"], "quorum", "greater than 0"),
        (["--merge-device", "tpu"], "merge_device", "pattern"),
        (["--method", "fedavg"], "method", "flora"),
        (["--enrollment-token", "short"], "enrollment_token", "at least 16"),
        (["--target-modules", "q_proj,../x"], "target_modules", "dotted module name"),
        (["--downlink-energy", "0.4"], "downlink_energy", "greater than or equal to 0.5"),
        (["--downlink-energy", "1.5"], "downlink_energy", "less than or equal to 1"),
        (["--downlink-max-rank", "-1"], "downlink_max_rank", "greater than or equal to 0"),
        (["--downlink-dtype", "float64"], "downlink_dtype", "float32"),
        (["--catchup-versions", "0"], "catchup_versions", "greater than or equal to 1"),
    ],
)
def test_invalid_settings_name_the_field_and_the_limit(argv, field, message):
    with pytest.raises(SettingsError) as error:
        settings_from(argv)
    assert f"{field}:" in str(error.value) and message in str(error.value)


def test_plaintext_beyond_loopback_needs_an_explicit_choice(tmp_path):
    assert settings_from(["--host", "0.0.0.0", "--insecure"]).insecure
    tls = settings_from(["--host", "0.0.0.0", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert tls.tls_cert.name == "c.pem"
    assert is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("10.0.0.1") and not is_loopback("example.org")


def test_unknown_config_keys_are_refused(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text("roundz = 3\n")
    with pytest.raises(SettingsError, match="roundz"):
        settings_from([], config=config)


def test_print_config_round_trips_and_hides_secrets(tmp_path, capsys):
    main(["--print-config", "--rounds", "9", "--operator-token", "operator-0123456789abcdef"])
    text = capsys.readouterr().out
    assert "operator-0123456789abcdef" not in text
    values = tomllib.loads(text)
    assert values["rounds"] == 9 and values["method"] == "flora-warm" and "operator_token" not in values
    config = tmp_path / "echo.toml"
    config.write_text(text)
    assert settings_from([], config=config) == settings_from(["--rounds", "9"])


def test_invalid_settings_exit_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--port", "70000"])
    assert exit_.value.code == 2
    assert "port" in capsys.readouterr().err


def test_help_shows_the_values_a_user_types_and_the_token_minimum():
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "(default: flora-warm)" in text and "(default: examples)" in text
    assert "Method." not in text and "ServerWeighting." not in text
    assert "at least 16 characters" in text


def test_a_short_token_is_refused_in_characters():
    with pytest.raises(SettingsError) as error:
        settings_from(["--operator-token", "short"])
    assert "operator_token must be at least 16 characters" in str(error.value) and "items" not in str(error.value)


def test_robustness_settings_have_limits():
    assert settings_from([]).robust_policy.max_weight_share == 0.5
    assert settings_from(["--max-weight-share", "1"]).robust_policy.max_weight_share is None
    for flags in (["--max-weight-share", "0"], ["--clip-median-multiple", "0.5"], ["--max-update-norm", "-1"]):
        with pytest.raises(SettingsError):
            settings_from(flags)


@pytest.mark.slow
def test_a_second_server_on_a_port_in_use_fails_naming_it_and_exits_non_zero(tmp_path):
    """Issue 28 item 8: gRPC's default SO_REUSEPORT let two servers share a port, splitting clients."""
    with running_server(tmp_path / "first", "--min-clients", "1") as first:
        second = subprocess.Popen([sys.executable, "-m", "flora.server.cli", "--port", str(first.port), "--state-dir",
                                   str(tmp_path / "second"), "--method", "flora", "--min-clients", "1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output = ""
            for line in second.stdout:  # until it exits, or listens (the defect)
                output += line
                assert "listening on" not in line, output
            assert second.wait(60) != 0
        finally:
            second.kill()
        assert first.process.poll() is None
    assert f"cannot listen on 127.0.0.1:{first.port}: address already in use" in output
    assert not (tmp_path / "second" / "state.db").exists()  # refused before anything was written


def _refused_start(tmp_path, *flags: str) -> str:
    """Start flora-server with ``flags``: it must exit 2 and write nothing; its refusal."""
    state = tmp_path / "state"
    result = subprocess.run([sys.executable, "-m", "flora.server.cli", "--port", "0", "--state-dir", str(state), *flags],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and not state.exists()  # nothing written, not even the folder
    start = result.stderr.index("flora-server: ")  # after the start's log lines: the refusal, nothing else
    return result.stderr[start:].strip()


@pytest.mark.slow
def test_configuration_errors_are_one_line_naming_the_field_exit_2_and_write_nothing(tmp_path):
    """Issue 28 item 15."""
    line = _refused_start(tmp_path, "--base-model", str(tmp_path / "no-such-folder"))
    assert line.startswith("flora-server: base_model: folder ") and "does not exist" in line and "\n" not in line
    line = _refused_start(tmp_path, "--base-model", "nobody-here/no-such-model")
    assert line.startswith("flora-server: base_model: ") and "HF_HUB_OFFLINE" in line and "\n" not in line
    line = _refused_start(tmp_path, "--validation-data", str(tmp_path / "missing.jsonl"))  # refused with the settings
    assert "validation_data: " in line and "missing.jsonl" in line
    (tmp_path / "bad.jsonl").write_text('{"instruction": "hi"\n')
    line = _refused_start(tmp_path, "--validation-data", str(tmp_path / "bad.jsonl"))
    assert line.startswith("flora-server: validation_data: ") and "bad.jsonl" in line and "\n" not in line
