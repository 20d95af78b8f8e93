"""What the ServerApp and the ClientApp share: the run's settings, its data, PEFT's state dict.

The data, the base model, the local trainer and the seeds are flora's own, exactly as
bench/quality.py sets them up for ``fedit`` with equal ranks (``flora.sim.federation`` for the
clients' subsamples and the validation set, ``flora.client.trainer.train_lora`` for the local
steps, ``flora.sim.engine.derive_seed`` for the per-client and global-LoRA seeds), so a run here
differs from flora-sim's ``fedit`` by the runtime and the state-dict round trip alone. What goes
over Flower is PEFT's own LoRA state dict (``get_peft_model_state_dict``), as Flower's FlowerTune
LLM template sends it. None of the flora modules imported here imports protobuf (Flower's venv
keeps its protobuf 6; flora's stubs need 7).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from flora.client.trainer import TrainConfig
from flora.common.architectures import target_suffixes
from flora.common.basemodel import load_model, load_tokenizer
from flora.common.lora import LoraAdapter, LoraPair
from flora.sim.engine import derive_seed
from flora.sim.federation import DataOptions, Federation, client_files, load_federation

ADAPTER = "default"
PREFIX = "base_model.model."  # PeftModel's names for the base model's modules


@dataclass(frozen=True)
class Settings:
    """The run config of the app (see pyproject.toml), typed."""

    base_model: str
    data_dir: str
    num_clients: int
    rounds: int
    seed: int
    data_seed: int
    local_steps: int
    batch_size: int
    learning_rate: float
    cutoff: int
    examples_per_client: int
    validation_fraction: float
    rank: int
    out: str

    @classmethod
    def from_run_config(cls, config: dict) -> Settings:
        return cls(**{f.name: _KINDS[f.type](config[f.name.replace("_", "-")]) for f in dataclasses.fields(cls)})

    @property
    def alpha(self) -> float:
        """bench.quality's alpha = 2 x rank (TrainConfig's default)."""
        return 2.0 * self.rank

    def local(self, client: int, server_round: int) -> TrainConfig:
        """Client ``client``'s local training in ``server_round``: flora-sim's seed for it (engine._jobs)."""
        return TrainConfig(max_steps=self.local_steps, batch_size=self.batch_size, learning_rate=self.learning_rate,
                           device="cpu", rank=self.rank, seed=derive_seed(self.seed, "client", client, server_round))


_KINDS = {"str": str, "int": int, "float": float}


@functools.lru_cache(maxsize=1)
def federation(settings: Settings) -> Federation:
    """bench.quality's federation: every client's seeded subsample, and the shared validation set."""
    options = DataOptions("alpaca", settings.cutoff, False, settings.examples_per_client, settings.validation_fraction,
                          settings.data_seed)
    files = client_files(Path(settings.data_dir))
    if len(files) != settings.num_clients:
        raise ValueError(f"num-clients is {settings.num_clients} but {settings.data_dir} holds {len(files)} client files")
    return load_federation(files, load_tokenizer(settings.base_model), options)


def base_model(settings: Settings) -> nn.Module:
    return load_model(settings.base_model)


def peft_model(model: nn.Module, settings: Settings) -> PeftModel:
    """The base wrapped as the FlowerTune template wraps it (LoRA on flora's default target modules of its family)."""
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(target_suffixes(model, None)),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _layers(model: PeftModel) -> dict[str, LoraLayer]:
    return {name.removeprefix(PREFIX): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_of(model: PeftModel, scaling: float) -> LoraAdapter:
    """The PEFT model's LoRA factors as flora's ``LoraAdapter`` (what flora's trainer starts from)."""
    return LoraAdapter({name: LoraPair(layer.lora_A[ADAPTER].weight.detach().clone(),
                                       layer.lora_B[ADAPTER].weight.detach().clone())
                        for name, layer in sorted(_layers(model).items())}, scaling)


def state_dict_of(model: nn.Module, adapter: LoraAdapter, settings: Settings) -> dict[str, torch.Tensor]:
    """PEFT's LoRA state dict of ``model`` with ``adapter``'s factors in its layers; ``model`` left bare."""
    wrapped = peft_model(model, settings)
    layers = _layers(wrapped)
    if set(layers) != set(adapter.pairs):
        raise ValueError(f"PEFT adapted {sorted(layers)}, the adapter has {adapter.module_names}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A[ADAPTER].weight.copy_(adapter.pairs[name].a)
            layer.lora_B[ADAPTER].weight.copy_(adapter.pairs[name].b)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(wrapped).items()}
    wrapped.unload()
    return state


def adapter_from_state_dict(model: nn.Module, state: dict[str, torch.Tensor], settings: Settings) -> LoraAdapter:
    """``set_peft_model_state_dict`` into a PEFT wrapping of ``model``, read back as factors; ``model`` left bare."""
    wrapped = peft_model(model, settings)
    result = set_peft_model_state_dict(wrapped, state)
    if result.unexpected_keys:
        raise ValueError(f"state dict keys PEFT does not know: {result.unexpected_keys[:3]}")
    adapter = adapter_of(wrapped, settings.alpha / settings.rank)
    wrapped.unload()
    return adapter


def message_bytes(message: Message) -> int:
    """Bytes of a message as Flower moves it: every object of its tree (message, records, arrays, chunks), deflated."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def array_bytes(message: Message) -> int:
    """Bytes of the tensors alone (float32 values) in a message's array records."""
    return sum(int(array.numpy().nbytes) for record in message.content.array_records.values() for array in record.values())
