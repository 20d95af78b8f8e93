"""The client's local material: its data, its copy of the base model, and their checks.

Everything here runs before the first round and fails with ``ConfigError`` (exit status 2, a
message naming the file, field or module at fault) rather than a traceback: a wrong data file,
a base model whose weights differ from the server's, or a target-module override that names
modules the run does not adapt are mistakes of the operator, found before any training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flora.client.config import ClientSettings
from flora.client.layer_placement import place_layers
from flora.client.local_weights import LocalWeights, local_weights
from flora.common.architectures import ALL_LINEAR, layer_shape
from flora.common.basemodel import fingerprint, load_model, load_tokenizer
from flora.common.devices import resolve_device
from flora.common.data import Conversation, DataFormatError, Example, TokenizedExample, load_examples, tokenize_examples
from flora.common.methods import AggregationMethod
from flora.common.methods.wire import from_wire
from flora.common.quantize import MissingExtra, bitsandbytes
from flora.v1 import run_pb2

log = logging.getLogger(__name__)
# The quantized base's compute dtype on CUDA follows the training's autocast dtype (float32 on CPU).
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}


class ConfigError(Exception):
    """A mistake in the client's configuration, data or model; reported without a traceback."""


Examples = list[Example | Conversation]


def load_data(settings: ClientSettings) -> tuple[Examples, Examples]:
    """The training and validation examples (validation empty when no file is given)."""
    read = {"template": settings.template, "data_format": settings.data_format, "fields": settings.field}
    try:
        train = load_examples(settings.data, **read)
        validation = load_examples(settings.validation_data, **read) if settings.validation_data else []
    except (DataFormatError, ValueError) as exc:
        raise ConfigError(f"data: {exc}") from None
    log.info("event=data_loaded train_examples=%d validation_examples=%d", len(train), len(validation))
    return train, validation


def check_extras(settings: ClientSettings) -> None:
    """Fail before connecting when a setting needs an optional package that is not installed."""
    if settings.quantize != "none":
        try:
            bitsandbytes()
        except MissingExtra as exc:
            raise ConfigError(str(exc)) from None


def trained_modules(settings: ClientSettings, spec: run_pb2.RunSpec) -> list[str]:
    """The run's modules this client trains: all (unset, or ``all-linear``), or those its ``target_modules`` selects.

    An entry selects a module by its full name or by a dotted suffix, as PEFT does. The upload
    still covers every module of the run: a module left out contributes a zero update, which
    fresh stacking keeps exact. Averaging and warm-started methods have no such neutral element
    (a zero would undo the module's warm start), so they refuse it.
    """
    names = [m.name for m in spec.target_modules]
    if settings.target_modules is None or ALL_LINEAR in settings.target_modules:
        return names
    method = run_method(spec)
    if not method.partial_modules:
        raise ConfigError(f"target_modules: an override is not possible in {method.name} runs (every client trains every module)")
    chosen = []
    for entry in settings.target_modules:
        matches = [n for n in names if n == entry or n.endswith("." + entry)]
        if not matches:
            raise ConfigError(f"target_modules: {entry!r} matches none of the run's target modules {names}")
        chosen.extend(matches)
    return sorted(set(chosen))


def run_method(spec: run_pb2.RunSpec) -> AggregationMethod:
    """The run's aggregation method, or a ConfigError when this client does not know it."""
    try:
        return from_wire(spec.method)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class LocalModel:
    """The base model (at some global version), its tokenizer and the tokenised local data."""

    weights: LocalWeights  # the model, merged or quantized with the update beside it
    source: str
    digest: str  # fingerprint of the target modules' unquantized base weights, equal to the run's
    train: list[TokenizedExample]
    validation: list[TokenizedExample]

    @property
    def model(self) -> nn.Module:
        """The model to train."""
        return self.weights.model


def check_modules(model: nn.Module, spec: run_pb2.RunSpec) -> None:
    """Every target module of the run exists in ``model`` as a linear (or Conv1D) layer of the same (out, in) shape."""
    modules = dict(model.named_modules())
    for target in spec.target_modules:
        shape = layer_shape(modules[target.name]) if target.name in modules else None
        if shape is None:
            raise ConfigError(f"base model: the run's target module {target.name!r} is not a linear layer of this model")
        if shape != (target.out_features, target.in_features):
            raise ConfigError(
                f"base model: module {target.name!r} is {shape}, the run's is {(target.out_features, target.in_features)}"
            )


def load_base(settings: ClientSettings, source: str) -> nn.Module:
    """The base model ``source`` in full precision, or a ConfigError saying what to pass.

    At its home (``model_home``), or on the CPU when it is quantized or spread over devices later.
    """
    try:
        for device in settings.devices or ():
            resolve_device(device)
    except ValueError as exc:
        raise ConfigError(f"--devices: {exc}") from None
    try:
        resolve_device(settings.device)  # checked also when quantizing, which moves the model there later
    except ValueError as exc:  # the device, not the model: a local copy of the model would not help
        raise ConfigError(f"--device: {exc}; use --device auto (CUDA when present, else CPU) or cpu") from None
    try:
        home = model_home(settings)
        return load_model(source, device=home if settings.quantize == "none" and home is not None else "cpu")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base model {source!r} cannot be loaded ({exc}); point --base-model at a local copy") from None


def model_home(settings: ClientSettings) -> torch.device | None:
    """Where the client keeps its model between rounds: the training device; the CPU for a daemon
    whose workers train (each moves or shards its own copy, so the daemon's takes no device's
    memory); None when it is spread over ``--devices`` (``--shard layers``)."""
    if settings.shard == "layers":
        return None
    if settings.training_processes > 1:
        return torch.device("cpu")
    return resolve_device(settings.device)


def prepare_weights(settings: ClientSettings, model: nn.Module, names: list[str]) -> LocalWeights:
    """The checked base as the client's local weights: as loaded, or quantized per ``--quantize``."""
    device = resolve_device(settings.device)
    compute = _COMPUTE_DTYPES[settings.dtype] if device.type == "cuda" else torch.float32
    try:
        return local_weights(model, names, settings.quantize, compute, model_home(settings))  # quantized: one device
    except (MissingExtra, ValueError) as exc:  # not installed, or nothing this model has can be quantized
        raise ConfigError(str(exc)) from None


def load_local_model(settings: ClientSettings, spec: run_pb2.RunSpec, data: tuple[Examples, Examples]) -> LocalModel:
    """Load the base model the run names (or ``--base-model``), check it is the server's, tokenise."""
    source = settings.base_model or spec.base_model
    model = load_base(settings, source)
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer of {source!r} cannot be loaded ({exc}); point --base-model at a local copy") from None
    check_modules(model, spec)
    names = [m.name for m in spec.target_modules]
    digest = fingerprint(model, names)  # of the unquantized weights: the server's model is never quantized
    if digest != spec.base_model_hash:
        raise ConfigError(
            f"base model {source!r} differs from the server's: target-module hash {digest[:12]} != {spec.base_model_hash[:12]}"
        )
    if settings.shard == "layers":
        try:
            place_layers(model, settings.devices)
        except ValueError as exc:
            raise ConfigError(f"--shard layers: {exc}") from None
    weights = prepare_weights(settings, model, names)
    train, validation = (tokenize_local(examples, tokenizer, settings) for examples in data)
    warn_rank_above_modules(settings.rank, spec)
    log.info("event=model_loaded source=%s modules=%d hash=%s quantize=%s", source, len(names), digest[:12], settings.quantize)
    return LocalModel(weights, source, digest, train, validation)


def warn_rank_above_modules(rank: int, spec: run_pb2.RunSpec) -> list[str]:
    """Warn about (and return) the run's modules smaller than ``rank`` in either dimension.

    A rank above min(d_out, d_in) adds nothing the module's update could express, and its factors,
    rank (d_in + d_out) numbers, outweigh the dense update's d_out d_in. The rank is not capped
    per module: an update has one rank for every module (protos/PROTOCOL.md, "Payloads"), and the
    server checks each module's shapes against it; the warning says which modules and what to set.
    """
    small = [m for m in spec.target_modules if rank > min(m.out_features, m.in_features)]
    if small:
        smallest = min(min(m.out_features, m.in_features) for m in small)
        log.warning("event=rank_above_module_size rank=%d modules=%d smallest=%d first=%s hint=%r", rank, len(small),
                    smallest, small[0].name, f"directions past {smallest} add nothing and cost upload bytes: "
                    f"--rank {smallest} or lower")
    return [m.name for m in small]


def tokenize_local(examples: Examples, tokenizer: Any, settings: ClientSettings) -> list[TokenizedExample]:
    """The client's examples as training tokens, warning when masking leaves some with no loss."""
    try:
        tokenized = tokenize_examples(examples, tokenizer, cutoff=settings.cutoff, mask_prompt=settings.mask_prompt)
    except ValueError as exc:  # --template chat with a tokenizer that has no chat template, or refuses a chat
        raise ConfigError(f"data: {exc}") from None
    silent = sum(1 for example in tokenized if example.labelled == 0)
    if silent:
        # With the prompt masked, an example whose prompt fills the cutoff teaches nothing.
        log.warning("event=examples_without_loss count=%d of=%d cutoff=%d hint=%r", silent, len(tokenized),
                    settings.cutoff, "raise --cutoff or drop --mask-prompt")
    return tokenized
