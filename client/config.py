"""``flora-client`` settings: one flat pydantic model behind the config file, env and flags.

The training hyper-parameters are not redefined here: ``ClientSettings`` is derived from
``flora.client.trainer.TrainConfig`` (same names, limits and help text), extended with what
only the daemon needs (server, identity, data, state, transport). ``train_config`` turns the
settings plus the run's target modules and the server's hints into the ``TrainConfig`` of one
round. Environment variables use the ``FLORA_CLIENT_`` prefix (``FLORA_CLIENT_TOKEN``, ...).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, FilePath, SecretStr, StringConstraints, create_model, field_validator, model_validator,
)

from flora.client.trainer import TrainConfig
from flora.common.addresses import is_loopback
from flora.common.architectures import check_target_names
from flora.common.quantize import Quantization
from flora.common.data import DATA_FORMATS
from flora.common.data.readers import check_sources
from flora.v1 import run_pb2

ENV_PREFIX = "FLORA_CLIENT_"
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# The client replaces TrainConfig's target-module suffixes with the run's module names; its own
# ``target_modules`` setting only narrows those (see ``train_config``).
_OWN_TRAIN_FIELDS = ("target_modules", "round", "rounds")  # round and rounds come from the task and the run
TRAIN_FIELDS = tuple(name for name in TrainConfig.model_fields if name not in _OWN_TRAIN_FIELDS)

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})$")


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) as (host without brackets, port)."""
    match = _HOST_PORT.fullmatch(address)
    if not match:
        raise ValueError(f"{address!r} is not HOST:PORT (IPv6 hosts in brackets: [::1]:50051)")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} of {address!r} is outside 1..65535")
    return match["host"].strip("[]"), port


class _DaemonFields(BaseModel):
    """The daemon's own settings; the training fields are added from TrainConfig below."""

    model_config = ConfigDict(extra="forbid")

    server: str = Field("localhost:50051", description="address of flora-server, HOST:PORT")
    name: str = Field(pattern=NAME_PATTERN, description="this client's unique name (letters, digits, . _ -; at most 64)")
    data: list[str] = Field(
        min_length=1, description="training data, comma-separated: JSON, JSONL, CSV or parquet files, save_to_disk "
        "folders (FOLDER[:SPLIT]) or data sets in the local Hugging Face cache (NAME[:SPLIT])",
    )
    validation_data: list[str] = Field([], description="held-out data (as --data) whose loss is reported with each upload")
    template: str = Field("alpaca", min_length=1, description="prompt template: chat (the tokenizer's own chat "
                          "template), alpaca, plain, or a format string with {instruction} and {input}")
    data_format: Literal[DATA_FORMATS] = Field("auto", description="record form of the data; auto: detected per file")
    field: list[str] = Field([], description="column mapping FORM_KEY=YOUR_KEY, e.g. instruction=question (repeatable)")
    cutoff: int = Field(256, ge=2, le=65536, description="maximum tokens per example (prompt + response)")
    mask_prompt: bool = Field(False, description="exclude the prompt's tokens from the training loss")
    base_model: str | None = Field(None, description="local path or Hub id of the base model; default: the run's base model")
    quantize: Quantization = Field(
        "none", description="hold the base in 4 bits (nf4, fp4) or 8 bits (int8) with bitsandbytes, the global update beside it"
    )
    target_modules: list[str] | None = Field(
        None, description="train only these of the run's target modules (names or suffixes); default (or all-linear): all of them"
    )
    state_dir: Path = Field(Path("flora-client-state"), description="local state: identity, held global version, cached downloads")
    token: SecretStr | None = Field(None, description="enrolment token of the server (only for the first Join)")
    tls_ca: FilePath | None = Field(None, description="PEM CA bundle to verify the server with (default: system roots off loopback)")
    tls_cert: FilePath | None = Field(None, description="PEM client certificate for mutual TLS (with --tls-key)")
    tls_key: FilePath | None = Field(None, description="PEM private key of --tls-cert")
    insecure: bool = Field(False, description="allow a plaintext connection to a non-loopback server")
    rpc_timeout: float = Field(30.0, ge=0.1, le=3600, description="deadline of each short call, in seconds")
    transfer_timeout: float = Field(600.0, ge=1, le=86400, description="deadline of each download or upload stream, in seconds")
    long_poll: float = Field(30.0, ge=0, le=600, description="how long the server may hold a NextTask call, in seconds")
    heartbeat_interval: float = Field(5.0, ge=0.1, le=600, description="seconds between heartbeats while syncing, training or uploading")
    backoff_initial: float = Field(0.5, ge=0.01, le=600, description="first reconnect delay after a failed call, in seconds")
    backoff_max: float = Field(30.0, ge=0.01, le=3600, description="largest reconnect delay, in seconds")
    give_up_after: int = Field(
        8, ge=0, le=10000, description="consecutive tries that fail for a configuration mistake (a host name that does "
        "not resolve, a refused TLS handshake) before the client stops with exit status 2; 0: never give up"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="least severe log level shown")
    progress: Literal["auto", "on", "off"] = Field("auto", description="progress bars: auto (when stderr is a terminal), on, off")
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads per training process; default: this host's usable cores divided among them"
    )
    nproc: int = Field(
        1, ge=1, le=64, description="data-parallel training processes (torch.distributed: gloo on CPU, one CUDA device each)"
    )
    devices: list[Annotated[str, StringConstraints(pattern=r"^(cpu|cuda:\d+)$")]] | None = Field(
        None, min_length=1, description="devices of the data-parallel processes, comma-separated (cuda:0,cuda:1); sets nproc "
        "(with --shard layers: the devices the one process spreads the model over)",
    )
    shard: Literal["auto", "none", "full", "layers"] = Field(
        "auto", description="how several devices hold the model: none (each data-parallel process a whole copy), full "
        "(FSDP: each holds a shard of every layer), layers (one process, the layers spread over --devices), auto (full "
        "when the base exceeds a CUDA device's free memory, else none)",
    )

    @field_validator("server")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        split_address(value)
        return value

    @field_validator("data", "validation_data", mode="before")
    @classmethod
    def _known_sources(cls, value: object) -> object:
        return check_sources(value)

    @field_validator("target_modules")
    @classmethod
    def _non_empty_modules(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one module, or leave unset to train all of the run's modules")
        if value is not None:
            check_target_names(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _DaemonFields:
        if self.backoff_max < self.backoff_initial:
            raise ValueError(f"backoff_max ({self.backoff_max}) must be >= backoff_initial ({self.backoff_initial})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (mutual TLS needs both)")
        if self.insecure and (self.tls_ca or self.tls_cert):
            raise ValueError("insecure contradicts tls_ca/tls_cert: choose plaintext or TLS")
        if self.devices and self.nproc not in (1, len(self.devices)):
            raise ValueError(f"nproc ({self.nproc}) contradicts devices ({len(self.devices)} given): give one of them")
        self._check_shard()
        if self.quantize != "none" and self.training_processes > 1:  # workers load merged weights, not a held update
            raise ValueError(f"quantize ({self.quantize}) works with one training process, not {self.training_processes}: "
                             "drop --nproc/--devices or --quantize")
        return self

    def _check_shard(self) -> None:
        """Refuse the --shard combinations that cannot work, naming the flags."""
        if len({device.split(":")[0] for device in self.devices or ()}) > 1:
            raise ValueError(f"devices {self.devices} mix the CPU and CUDA: one kind per client")
        repeated = sorted({d for d in self.devices or () if d != "cpu" and self.devices.count(d) > 1})
        if repeated:  # two NCCL ranks on one GPU fail; layers spread over it would count its memory twice
            raise ValueError(f"devices {self.devices} name {repeated[0]} twice: one process, or one share of the "
                             "layers, per CUDA device")
        if self.shard == "full" and self.quantize != "none":
            raise ValueError(f"shard full splits a full-precision base over processes; quantize ({self.quantize}) "
                             "trains in one: drop --shard full or --quantize")
        if self.shard == "full" and self.training_processes < 2:
            raise ValueError("shard full splits the model over data-parallel processes: add --nproc N or --devices")
        if self.shard == "layers":
            if self.nproc != 1 or len(self.devices or ()) < 2:
                raise ValueError("shard layers spreads the model over the --devices of one process: give two or more "
                                 "--devices (cuda:0,cuda:1) and no --nproc")
            if self.quantize != "none":
                raise ValueError(f"shard layers works with a full-precision base, not quantize ({self.quantize})")
            if self.device not in ("auto", self.devices[0]):
                raise ValueError(f"device ({self.device}) contradicts shard layers, whose inputs go to the first of "
                                 f"--devices ({self.devices[0]}): drop --device")
            self.device = self.devices[0]

    @property
    def training_processes(self) -> int:
        """How many processes train each round: one per device of ``devices`` (one with ``shard`` layers), else ``nproc``."""
        if self.shard == "layers":
            return 1
        return len(self.devices) if self.devices else self.nproc

    @property
    def uses_tls(self) -> bool:
        """TLS unless explicitly insecure, or a loopback server with no CA given."""
        if self.insecure:
            return False
        return self.tls_ca is not None or self.tls_cert is not None or not is_loopback(split_address(self.server)[0])

    def own_train_config(self) -> TrainConfig:
        """This client's own training settings, before the run and the round adjust them."""
        return TrainConfig(**{name: getattr(self, name) for name in TRAIN_FIELDS})

    def train_config(
        self, modules: list[str], hints: run_pb2.TrainingHints, num_examples: int, seed: int, round_number: int = 1,
        rounds: int = 1,
    ) -> TrainConfig:
        """The TrainConfig of one round: own settings, the server's non-zero hints over them.

        ``modules`` are the full module names to adapt (PEFT matches whole names exactly), and
        ``seed`` is the round's seed, so that every round starts from a different fresh LoRA.
        ``round_number`` of the run's ``rounds`` places the round on a ``run`` schedule.
        A fractional ``local_epochs`` hint becomes the equivalent number of optimiser steps.
        """
        values = self.own_train_config().model_dump()
        values.update(target_modules=tuple(modules), seed=seed, round=max(1, round_number), rounds=max(1, rounds))
        if hints.batch_size:
            values["batch_size"] = hints.batch_size
        if hints.learning_rate:
            values["learning_rate"] = hints.learning_rate
        if hints.max_steps:
            values["max_steps"] = hints.max_steps
        elif hints.local_epochs > 0:
            epochs = hints.local_epochs
            if epochs.is_integer():
                values.update(epochs=int(epochs), max_steps=0)
            else:
                batches = math.ceil(num_examples / values["batch_size"])
                values["max_steps"] = max(1, math.ceil(epochs * batches / values["grad_accum"]))
        return TrainConfig(**values)


ClientSettings = create_model(
    "ClientSettings",
    __base__=_DaemonFields,
    __doc__="Everything flora-client is configured with; each field is a flag, an env variable and a file key.",
    **{name: (TrainConfig.model_fields[name].annotation, TrainConfig.model_fields[name]) for name in TRAIN_FIELDS},
)
