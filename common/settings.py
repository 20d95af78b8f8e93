"""Layered configuration: defaults < config file (TOML/YAML) < environment < command-line flags.

Each program describes all of its settings once, as a flat pydantic model whose field
descriptions are the help text and whose constraints are the limits. This module derives the
argparse flags and the environment variable names from that model, merges the layers and turns
validation failures into one readable error naming each field, the limit and the source.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

Settings = TypeVar("Settings", bound=BaseModel)


class SettingsError(ValueError):
    """A configuration that cannot be used; the message lists every offending field."""


def flag_name(field: str) -> str:
    """The command-line flag of a field: ``state_dir`` -> ``--state-dir``."""
    return "--" + field.replace("_", "-")


def _is_sequence(annotation: Any) -> bool:
    """Whether a field holds a list/tuple (given as comma-separated text on flags and env)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return origin in (list, tuple, Sequence) or annotation in (list, tuple)


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (typing.get_origin(annotation) in (typing.Union, types.UnionType) and bool in typing.get_args(annotation))


def add_settings_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], aliases: Mapping[str, str] = {}) -> None:
    """Add one flag per field of ``model`` (default None, so unset flags do not override lower layers).

    ``aliases`` maps a field to an extra flag spelling, e.g. {"server_address": "--server"}.
    A list field's flag may be repeated, each value comma-separated: ``--field a=b --field c=d``.
    """
    for name, field in model.model_fields.items():
        flags = [flag_name(name)] + ([aliases[name]] if name in aliases else [])
        default = "required" if field.is_required() else f"default: {_render_value(field.get_default(call_default_factory=True))}"
        help_text = f"{field.description or ''} ({default})"
        if _is_bool(field.annotation):
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            action = "append" if _is_sequence(field.annotation) else "store"
            parser.add_argument(*flags, dest=name, action=action, default=None, metavar=name.upper(), help=help_text)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (.toml) or YAML (.yaml, .yml) settings file into a mapping of field values."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror or exc}") from exc
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise SettingsError(f"config file {path}: unknown format {suffix!r}; use .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(f"config file {path}: not valid {suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: the top level must be a table of settings, got {type(data).__name__}")
    return {key.replace("-", "_"): value for key, value in data.items()}


def _from_text(model: type[BaseModel], name: str, value: Any) -> Any:
    """Turn flag/env text into what pydantic expects: comma lists become lists."""
    if isinstance(value, str) and _is_sequence(model.model_fields[name].annotation):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def environment_values(model: type[BaseModel], prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Field values from ``<PREFIX><FIELD>`` environment variables, e.g. FLORA_STATE_DIR."""
    environ = os.environ if environ is None else environ
    values = {}
    for name in model.model_fields:
        key = prefix + name.upper()
        if key in environ:
            values[name] = _from_text(model, name, environ[key])
    return values


def load_settings(
    model: type[Settings],
    *,
    config_file: Path | None = None,
    env_prefix: str = "",
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Validate the merged layers into ``model``; every invalid field is reported with its source."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        values = {k: _from_text(model, k, v) if k in model.model_fields else v for k, v in read_config_file(config_file).items()}
        layers.append((f"config file {config_file}", values))
    layers.append(("environment", environment_values(model, env_prefix, environ)))
    cli = {
        k: _from_text(model, k, ",".join(v) if isinstance(v, list) else v)  # a repeated list flag
        for k, v in (flags or {}).items() if v is not None and k in model.model_fields
    }
    layers.append(("command line", cli))
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in layers:
        merged.update(values)
        origin.update(dict.fromkeys(values, source))
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, origin, env_prefix)) from None


def _describe(exc: ValidationError, origin: Mapping[str, str], env_prefix: str) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        top = str(error["loc"][0]) if error["loc"] else ""
        source = origin.get(top, "defaults")
        hint = f"{flag_name(top)} / {env_prefix}{top.upper()}" if top and error["type"] != "extra_forbidden" else top
        lines.append(f"  {field}: {error['msg']} (got {error.get('input')!r} from {source}; set with {hint})")
    return "invalid settings:\n" + "\n".join(lines)


def _render_value(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)  # what a user types, not the Python name (Method.FLORA)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "[]"
    if isinstance(value, Path):
        return str(value)
    return json.dumps(value) if isinstance(value, (bool, type(None))) else str(value)


def render_settings(settings: BaseModel) -> str:
    """The effective settings as a TOML document that ``--config`` accepts back.

    Secrets are never printed: they appear as a comment saying that they are set.
    """
    lines = []
    for name, value in settings.model_dump(mode="json").items():
        if isinstance(getattr(settings, name), SecretStr):
            lines.append(f"# {name} is set (secret, not shown)")
        elif value is None:
            lines.append(f"# {name} is unset")
        else:
            lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
