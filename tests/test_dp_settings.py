"""flora-server's differential-privacy settings (issue 31 items 4, 5): flags, defaults and up-front refusals."""

from __future__ import annotations

import tomllib

import pytest

pytest.importorskip("dp_accounting")

from flora.common.methods import METHODS
from flora.common.settings import SettingsError
from flora.server.cli import main
from test_server_config import settings_from

DP = ["--dp-noise-multiplier", "4", "--dp-clip-norm", "0.5"]


def test_the_issue_flags_set_the_fields_and_dp_is_off_by_default():
    assert not settings_from([]).dp_enabled
    settings = settings_from(DP + ["--dp-target-epsilon", "8", "--dp-delta", "1e-6", "--dp-release", "dense",
                                   "--dp-accountant", "pld", "--method", "flora"])
    chosen = (settings.dp_noise_multiplier, settings.dp_clip_norm, settings.dp_target_epsilon, settings.dp_delta,
              settings.dp_release, settings.dp_accountant)
    assert chosen == (4.0, 0.5, 8.0, 1e-6, "dense", "pld")
    assert settings.dp_enabled and settings.dp_effective_delta == 1e-6


def test_weights_are_uniform_under_dp_unless_examples_are_chosen_explicitly(tmp_path):
    assert settings_from([]).weighting.value == "examples"  # without DP the default is unchanged
    assert settings_from(DP).weighting.value == "uniform"
    assert settings_from(DP + ["--weighting", "examples"]).weighting.value == "examples"
    config = tmp_path / "server.toml"
    config.write_text("dp_noise_multiplier = 4.0\ndp_clip_norm = 0.5\n")
    assert settings_from([], config=config).weighting.value == "uniform"


def test_toml_keys_are_the_field_names(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text("dp_noise_multiplier = 4.0\ndp_clip_norm = 0.5\ndp_release = 'dense'\n")
    settings = settings_from([], config=config)
    assert (settings.dp_noise_multiplier, settings.dp_clip_norm, settings.dp_release) == (4.0, 0.5, "dense")


def test_mechanisms_per_round_two_for_the_sketch_one_dense_one_for_ffa():
    assert settings_from(DP + ["--method", "flora"]).dp_mechanisms_per_round == 2
    assert settings_from(DP + ["--method", "flora-warm", "--dp-release", "dense"]).dp_mechanisms_per_round == 1
    assert settings_from(DP + ["--method", "ffa"]).dp_mechanisms_per_round == 1  # the summed B only


def test_default_delta_is_below_one_over_the_clients_a_round_waits_for():
    assert settings_from(DP).dp_effective_delta == 1e-5
    many = settings_from(DP + ["--min-clients", "50000"])
    assert many.dp_effective_delta == pytest.approx(1 / (10 * 50000)) and many.dp_effective_delta < 1 / 50000


@pytest.mark.parametrize(
    ("argv", "field", "message"),
    [
        (["--dp-noise-multiplier", "1"], "dp_clip_norm", "go together"),
        (["--dp-clip-norm", "1"], "dp_clip_norm", "go together"),
        (["--dp-noise-multiplier", "0"] + DP[2:], "dp_noise_multiplier", "greater than 0"),
        (DP + ["--method", "fedit"], "dp_noise_multiplier", "method fedit cannot run under differential privacy"),
        (DP + ["--method", "zeropad"], "dp_noise_multiplier", "use one of flora, flora-warm, ffa, flexlora"),
        (DP + ["--clip-median-multiple", "3"], "dp_noise_multiplier", "clip_median_multiple cannot be used"),
        (DP + ["--reject-median-multiple", "3"], "dp_noise_multiplier", "reject_median_multiple cannot be used"),
        (["--dp-delta", "1e-6"], "dp_delta", "differential privacy is off"),
        (["--dp-target-epsilon", "8"], "dp_target_epsilon", "differential privacy is off"),
        (DP + ["--min-clients", "4", "--dp-delta", "0.25"], "dp_delta", "below 1/min_clients"),
        (DP + ["--dp-target-epsilon", "0.5"], "dp_target_epsilon", "unreachable: the first round alone spends"),
        (DP + ["--dp-release", "rank"], "dp_release", "sketch"),
        (DP + ["--dp-accountant", "gdp"], "dp_accountant", "rdp"),
    ],
)
def test_refusals_name_the_field(argv, field, message):
    with pytest.raises(SettingsError) as error:
        settings_from(argv)
    assert f"{field}:" in str(error.value) and message in str(error.value)


def test_only_methods_with_a_private_release_run_under_dp():
    runnable = {name for name, method in METHODS.items() if method.dp_refusal is None}
    assert runnable == {"flora", "flora-warm", "flexlora", "ffa"}
    for name in METHODS:
        if name not in runnable:
            with pytest.raises(SettingsError, match=f"method {name} cannot run"):
                settings_from(DP + ["--method", name])


def test_a_fixed_clip_norm_is_allowed_it_bounds_each_client_alone():
    assert settings_from(DP + ["--clip-norm", "0.3"]).clip_norm == 0.3


def test_sampling_amplification_makes_a_target_reachable_at_the_clients_waited_for():
    """The first-round check counts the clients a round is sure of (min_clients): 2 of 2 spend more
    than 2 of 100, so the same target passes once the server waits for 100."""
    argv = DP + ["--clients-per-round", "2", "--dp-target-epsilon", "1"]  # 2 of 2: 3.19; 2 of 100: 0.54
    with pytest.raises(SettingsError, match="unreachable"):
        settings_from(argv)
    assert settings_from(argv + ["--min-clients", "100"]).dp_target_epsilon == 1


def test_refused_dp_settings_exit_2_naming_the_field(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--dp-noise-multiplier", "1", "--print-config"])
    assert exit_.value.code == 2 and "dp_clip_norm" in capsys.readouterr().err


def test_print_config_round_trips_the_dp_fields(capsys):
    main(["--print-config"] + DP + ["--dp-target-epsilon", "80"])
    values = tomllib.loads(capsys.readouterr().out)
    assert (values["dp_noise_multiplier"], values["dp_clip_norm"], values["dp_target_epsilon"]) == (4.0, 0.5, 80.0)


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--dp-noise-multiplier", "200"], "dp_noise_multiplier"),
        (["--method", "nope"], "method"),
        (["--dp-accountant", "gdp"], "dp_accountant"),
        (["--min-clients", "0"], "min_clients"),
    ],
)
def test_a_target_beside_another_invalid_field_names_that_field_not_a_traceback(argv, field):
    """The target's check reads other fields; one of them refused must be reported as itself."""
    with pytest.raises(SettingsError) as error:
        settings_from(["--dp-noise-multiplier", "4", "--dp-clip-norm", "0.5", "--dp-target-epsilon", "8"] + argv)
    assert f"{field}:" in str(error.value)


def test_flora_demo_passes_the_dp_flags_to_the_server_and_refuses_bad_ones_up_front(tmp_path, capsys):
    from flora.demo.cli import _server_args, parse_args
    from flora.demo.workspace import Workspace

    args = parse_args(["--clients", "3", "--method", "flora", "--dp-noise-multiplier", "4", "--dp-clip-norm", "0.5",
                       "--dp-target-epsilon", "30", "--dp-release", "dense"])
    flags = _server_args(args, Workspace(tmp_path), [tmp_path / "v.jsonl"], [4, 4, 4])
    assert {"--dp-noise-multiplier=4", "--dp-clip-norm=0.5", "--dp-target-epsilon=30", "--dp-release=dense"} <= set(flags)
    assert not [f for f in _server_args(parse_args([]), Workspace(tmp_path), [], [4]) if f.startswith("--dp-")]
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--method", "fedit", "--ranks", "4", "--dp-noise-multiplier", "4", "--dp-clip-norm", "0.5"])
    assert exit_.value.code == 2 and "method fedit cannot run under differential privacy" in capsys.readouterr().err
