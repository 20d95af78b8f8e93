"""The run's inputs, the base model and the validation data, loaded with errors that name their field.

A mistake in either is the operator's to fix, so it is reported as one line naming the setting
(``flora-server: base_model: ...``, exit status 2), not as a library's traceback, and it is found
before the state directory is touched (``flora.server.app.serve`` loads these first), so a
refused start leaves nothing behind. A Hub id that is neither a local folder nor in the local
cache is checked against the Hub with a short timeout, or refused at once when the Hub is off
(``HF_HUB_OFFLINE``): transformers' own retries took 49 s to fail without a network.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from flora.common.basemodel import BUILTIN_MODEL, load_model, load_tokenizer
from flora.common.data import TokenizedExample, load_examples, tokenize_examples
from flora.server.config import ServerSettings

HUB_TIMEOUT_S = 10.0
# What the Hub accepts as a model id: "name" or "namespace/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ConfigurationError(Exception):
    """A setting the server cannot start with; the message names the setting and what is wrong."""


def _first_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_model_source(name: str) -> None:
    """Refuse at once a base model that is no folder, not the built-in one and not a usable Hub id."""
    if name == BUILTIN_MODEL or Path(name).expanduser().is_dir():
        return
    folder = Path(name).expanduser().resolve()
    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        raise ConfigurationError(f"base_model: folder {str(folder)!r} does not exist")
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: transformers loads it without the network
    where = f"no folder {str(folder)!r} and no Hub id {name!r} in the local Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise ConfigurationError(f"base_model: {where}, and HF_HUB_OFFLINE is set: pass a local model folder")
    try:
        model_info(name, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - unreachable, unknown or gated: all say the same to the operator
        raise ConfigurationError(
            f"base_model: {where}, and the Hub does not serve it ({_first_line(err)}): pass a local model folder"
        ) from None


def load_base(settings: ServerSettings, dtype: torch.dtype, device: torch.device | str) -> tuple[Any, Any]:
    """The base model (in ``dtype`` on ``device``) and its tokenizer, or a ``ConfigurationError``."""
    check_model_source(settings.base_model)
    try:
        return load_model(settings.base_model, dtype, device), load_tokenizer(settings.base_model)
    except (OSError, ValueError) as err:
        raise ConfigurationError(f"base_model: {settings.base_model!r} cannot be loaded: {_first_line(err)}") from None


def load_validation(settings: ServerSettings, tokenizer: Any) -> list[TokenizedExample] | None:
    """The tokenised validation examples (None without ``validation_data``), or a ``ConfigurationError``."""
    if not settings.validation_data:
        return None
    try:
        examples = load_examples(settings.validation_data, settings.validation_template,
                                 data_format=settings.validation_data_format, fields=settings.validation_field)
        return tokenize_examples(
            examples, tokenizer, cutoff=settings.validation_cutoff, mask_prompt=settings.validation_mask_prompt
        )
    except (OSError, ValueError) as err:  # DataFormatError, a bad template or field, a tokenizer without a chat template
        raise ConfigurationError(f"validation_data: {_first_line(err)}") from None
