"""Layered settings: file < environment < flags, with errors naming field, limit and source."""

from __future__ import annotations

import argparse
import tomllib

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from flora.common.settings import SettingsError, add_settings_arguments, load_settings, render_settings


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(50051, ge=0, le=65535, description="TCP port")
    name: str = Field("server", description="a name")
    modules: list[str] = Field(["q_proj", "v_proj"], description="target modules")
    verbose: bool = Field(False, description="chatty logs")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, Example, aliases={"name": "--label"})
    return vars(parser.parse_args(argv))


def test_defaults_apply_when_nothing_is_given():
    assert load_settings(Example, flags=parse([]), environ={}) == Example()


def test_layers_override_in_order(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text('port = 1\nname = "file"\nmodules = ["a"]\n')
    environ = {"X_PORT": "2", "X_MODULES": "b, c"}
    settings = load_settings(Example, config_file=config, env_prefix="X_", flags=parse(["--label", "cli"]), environ=environ)
    assert settings == Example(port=2, name="cli", modules=["b", "c"])
    settings = load_settings(Example, config_file=config, env_prefix="X_", flags=parse(["--port", "3", "--verbose"]), environ=environ)
    assert (settings.port, settings.name, settings.verbose) == (3, "file", True)


def test_yaml_files_and_dashed_keys_are_accepted(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text("port: 7\nmodules: [x]\n")
    assert load_settings(Example, config_file=config, environ={}).modules == ["x"]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("port = ", ".toml", "not valid TOML"),
        ("port: [", ".yaml", "not valid YAML"),
        ("- 1\n- 2\n", ".yaml", "top level must be a table"),
        ("port = 1", ".ini", "unknown format"),
    ],
)
def test_bad_config_files_are_rejected(tmp_path, content, suffix, message):
    config = tmp_path / f"s{suffix}"
    config.write_text(content)
    with pytest.raises(SettingsError, match=message):
        load_settings(Example, config_file=config, environ={})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match="nope.toml"):
        load_settings(Example, config_file=tmp_path / "nope.toml", environ={})


def test_errors_name_field_limit_and_source(tmp_path):
    with pytest.raises(SettingsError) as err:
        load_settings(Example, env_prefix="X_", flags=parse(["--port", "70000"]), environ={})
    assert "port" in str(err.value) and "65535" in str(err.value) and "command line" in str(err.value)
    config = tmp_path / "s.toml"
    config.write_text("colour = 1\n")
    with pytest.raises(SettingsError, match="colour.*config file"):
        load_settings(Example, config_file=config, environ={})


def test_rendered_settings_load_back_as_toml(tmp_path):
    settings = Example(port=9, name='a "quoted" name', modules=["q", "k"], verbose=True)
    config = tmp_path / "back.toml"
    config.write_text(render_settings(settings))
    tomllib.loads(config.read_text())
    assert load_settings(Example, config_file=config, environ={}) == settings


class WithSecret(BaseModel):
    name: str = Field(description="who")
    token: SecretStr | None = Field(None, description="a secret")


def test_required_fields_say_so_in_help_and_secrets_never_print():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, WithSecret)
    assert "(required)" in parser.format_help()
    text = render_settings(WithSecret(name="x", token="hunter2-hunter2"))
    assert "hunter2" not in text and "token is set" in text


def test_a_single_string_in_a_file_fills_a_list_setting(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text('modules = "q_proj, k_proj"\n')
    assert load_settings(Example, config_file=config, environ={}).modules == ["q_proj", "k_proj"]
