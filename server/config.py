"""Every setting of ``flora-server`` in one validated model: defaults, limits and help text.

``flora.common.settings`` turns this model into the CLI flags, the ``FLORA_*`` environment
variables and the config-file keys, so a setting is described exactly once, here.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator

from flora.common.addresses import is_loopback
from flora.common.methods import METHODS, AggregationMethod, get_method
from flora.common.architectures import check_target_names
from flora.common.basemodel import BUILTIN_MODEL
from flora.common.data import DATA_FORMATS
from flora.common.data.readers import source_names
from flora.common.downlink import WIRE_DTYPES, DownlinkPolicy
from flora.common.lora import lora_scaling
from flora.common.privacy.accountant import MAX_SIGMA, check_installed, default_delta, epsilon_after_rounds
from flora.common.privacy.release import release_passes
from flora.common.robust import RobustPolicy
from flora.common.secagg.plan import check_secure
from flora.common.weights import Weighting
from flora.server.rounds import Selection

ENV_PREFIX = "FLORA_"
MiB = 1 << 20
MIN_TOKEN_CHARS = 16


class ServerWeighting(str, Enum):
    """Client weightings a server can compute from what clients report (no user-given weights)."""

    EXAMPLES = Weighting.EXAMPLES.value
    UNIFORM = Weighting.UNIFORM.value


class ServerSettings(BaseModel):
    """The configuration of one coordinator; the field descriptions are the ``--help`` text."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # --- network and security -------------------------------------------------------------
    # (TLS fields come first: validators of later fields read them.)
    tls_cert: Path | None = Field(None, description="PEM server certificate (enables TLS)")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA bundle; when set, clients need a certificate it signed (mTLS)",
    )
    insecure: bool = Field(False, description="allow plaintext on a non-loopback host (never on an untrusted network)")
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(50051, ge=0, le=65535, description="TCP port to listen on; 0 picks a free port")
    enrollment_token: SecretStr | None = Field(
        None,
        description=f"token a new client must present to join (at least {MIN_TOKEN_CHARS} characters); unset = open enrolment",
    )
    operator_token: SecretStr | None = Field(
        None,
        description=f"token that authorises Status calls without joining (at least {MIN_TOKEN_CHARS} characters)",
    )
    client_registry: Path | None = Field(
        None,
        description="clients file written by flora-admin provision: only those clients may join, each with its own token",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="serve Prometheus metrics over HTTP on this port of host (0 picks a free port); unset = no metrics",
    )
    # --- state and model ------------------------------------------------------------------
    state_dir: Path = Field(Path("flora-state"), description="directory holding the run's database and outputs")
    base_model: str = Field(
        BUILTIN_MODEL, min_length=1,
        description="base model: Hugging Face Hub id, local directory or the built-in name",
    )
    target_modules: list[str] | None = Field(
        None, min_length=1,
        description="suffixes of the linear layers LoRA adapts, or all-linear; default: the model family's (q_proj,v_proj; c_attn for GPT-2, qkv_proj for Phi-3)",
    )
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the server's copy of the model",
    )
    merge_device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="device for merging and evaluation: auto (first CUDA device, else CPU), cpu, cuda or cuda:N",
    )
    precision: Literal["float32", "float64"] = Field(
        "float32",
        description="arithmetic precision of aggregation and merging",
    )
    # --- downlink (flora) -------------------------------------------------------------------
    downlink_energy: float = Field(
        1.0, ge=0.5, le=1.0,
        description="share of each module's aggregate energy sent per round (1 = exact; below 1 the rest is carried)",
    )
    downlink_max_rank: int = Field(
        0, ge=0, le=65536,
        description="largest factor rank sent per module per round (0 = no cap; what is cut is carried)",
    )
    downlink_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the downlink's tensors (half precision halves it; the rounding is carried)",
    )
    catchup_versions: int = Field(
        4, ge=1, le=100_000,
        description="a client more than this many versions behind downloads the merged modules instead of replaying",
    )
    # --- rounds ---------------------------------------------------------------------------
    rounds: int = Field(5, ge=1, le=100_000, description="number of rounds in the run")
    min_clients: int = Field(2, ge=1, le=100_000, description="connected clients needed before a round opens")
    clients_per_round: str = Field(
        "all",
        description="clients selected per round: all, a count (e.g. 8) or a fraction in (0, 1] (e.g. 0.5), seeded",
    )
    quorum: float = Field(
        0.5, gt=0.0, le=1.0,
        description="fraction of the selected clients (at least 1) whose updates close a round at its deadline",
    )
    round_deadline_s: float = Field(600.0, gt=0.0, le=7 * 86400, description="seconds a round stays open for uploads")
    long_poll_s: float = Field(
        20.0, gt=0.0, le=3600,
        description="longest time NextTask holds a call before answering WAIT",
    )
    client_timeout_s: float = Field(
        90.0, gt=0.0, le=86400,
        description="a client silent for longer counts as lost (must exceed long_poll_s)",
    )
    seed: int = Field(
        0, ge=0, le=2**63 - 1,
        description="seed of client selection and of the initial global LoRA (fedit, zeropad, fedex, ffa)",
    )
    exit_after_finish_s: float | None = Field(
        None, ge=0.0,
        description="after the last round, keep serving this long, then exit; unset = serve until stopped",
    )
    # --- aggregation ----------------------------------------------------------------------
    method: str = Field(
        "flora-warm", description=f"aggregation method, one of {', '.join(METHODS)} (README, 'Aggregation methods')",
    )
    weighting: ServerWeighting = Field(
        ServerWeighting.EXAMPLES,
        description="client weights: examples (n_k / sum n) or uniform",
    )
    max_rank: int = Field(256, ge=1, le=65536, description="largest LoRA rank a client may declare")
    lora_rank: int = Field(
        8, ge=1, le=4096,
        description="fedit/zeropad/fedex/ffa: rank of the persistent global LoRA (at most max_rank)",
    )
    lora_alpha: float = Field(
        16.0, gt=0.0, le=1e6,
        description="fedit/zeropad/fedex/ffa: alpha of the global LoRA (every client must use the same scaling)",
    )
    rslora: bool = Field(
        False,
        description="fedit/zeropad/fedex/ffa: global LoRA scaling alpha / sqrt(rank) instead of alpha / rank",
    )
    max_update_bytes: int = Field(
        512 * MiB, ge=4096, le=1 << 40,
        description="largest update upload accepted, in bytes",
    )
    chunk_size: int = Field(
        MiB, ge=4096, le=16 * MiB,
        description="bytes per streamed chunk (clients upload in pieces no larger)",
    )
    stream_window_bytes: int = Field(
        MiB, ge=0, le=1 << 30,
        description="HTTP/2 receive window of each upload stream: bytes a client may send ahead of what the server "
                    "has read; 0 = grpc's own (grown by its bandwidth probe to 16 MiB and more). A fixed window "
                    "bounds the server's memory to a few chunks per concurrent upload (bench/uploadmem.py)",
    )
    # --- robustness (DESIGN.md section 6; protos/PROTOCOL.md, "Limits") -----------------
    max_update_norm: float | None = Field(
        None, gt=0.0,
        description="largest norm an upload's change from its start |s B A - init|_F (over all target modules) may have; "
                    "unset = max_update_norm_ratio x the norm of the base model's target-module weights; "
                    "not enforced under DP (a larger change is clipped to dp_clip_norm)",
    )
    max_update_norm_ratio: float = Field(
        100.0, gt=0.0, le=1e12,
        description="when max_update_norm is unset: the bound as a multiple of the base target-module weights' norm",
    )
    max_weight_share: float = Field(
        0.5, gt=0.0, le=1.0,
        description="largest share of a round's weights one client gets (with 3 or more clients); 1 = no cap",
    )
    clip_norm: float | None = Field(
        None, gt=0.0,
        description="clip each update's change |s B A - init|_F to this bound before aggregating; unset = no fixed bound",
    )
    clip_median_multiple: float | None = Field(
        None, ge=1.0, le=1e6,
        description="clip each update's norm to this multiple of the round's median norm; unset = no adaptive bound",
    )
    reject_median_multiple: float | None = Field(
        None, ge=1.0, le=1e6,
        description="leave out updates whose norm exceeds this multiple of the round's median (3+ clients); unset = keep all",
    )
    checkpoint_every: int = Field(
        5, ge=0, le=100_000,
        description="save a merged Hugging Face checkpoint every N rounds (0 = only at the end; the last round always)",
    )
    # --- client-level differential privacy (issue 31; README, "Differential privacy") -------
    # (after method, weighting, the robustness rules and the rounds: the validators read them.)
    dp_noise_multiplier: float | None = Field(
        None, gt=0.0, le=MAX_SIGMA,
        description="differential privacy: noise standard deviation of each release over dp_clip_norm (sigma); "
                    "needs dp_clip_norm; unset = no DP",
    )
    dp_clip_norm: float | None = Field(
        None, gt=0.0, le=1e12,
        description="differential privacy: each participant's change (all target modules together) is clipped "
                    "to this Frobenius norm C; needs dp_noise_multiplier",
    )
    dp_release: Literal["sketch", "dense"] = Field(
        "sketch",
        description="differential privacy: sketch (two noisy passes of a two-pass range finder, a low-rank "
                    "downlink) or dense (one noisy dense sum); ffa always releases its summed B only (one pass)",
    )
    dp_accountant: Literal["rdp", "pld"] = Field(
        "rdp",
        description="rdp: sampling without replacement, as the server samples (default); "
                    "pld: tighter, but accounts Poisson sampling (for comparison)",
    )
    dp_delta: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="differential privacy: the delta of the stated (epsilon, delta), below 1/min_clients; "
                    "unset = min(1e-5, 1/(10 min_clients))",
    )
    dp_target_epsilon: float | None = Field(
        None, gt=0.0, le=1e6,
        description="differential privacy: no round opens whose release would bring the spent epsilon past this; "
                    "the run ends there. unset = no cap",
    )
    # --- secure aggregation (issue 30; README, "Secure aggregation") ---------------------
    # (after method and the robustness rules: the validator reads them.)
    secure_aggregation: bool = Field(
        False,
        description="pairwise-masked uploads: the server learns only each round's sum (flora, flora-warm, flexlora, ffa); "
                    "clients clip to clip_norm (else max_update_norm; under DP to dp_clip_norm and clip_norm) and weight before "
                    "masking, and under DP the server noises the unmasked sums",
    )
    secure_stage_deadline_s: float = Field(
        60.0, gt=0.0, le=86_400.0,
        description="secure aggregation: seconds each stage (shares, masked input, unmasking) waits for the clients; "
                    "a client that misses one counts as dropped",
    )
    # --- evaluation -----------------------------------------------------------------------
    validation_data: list[str] = Field(
        [],
        description="data to evaluate the global model on after every round, comma-separated: JSON, JSONL, CSV or "
        "parquet files, save_to_disk folders or cached Hugging Face data sets (as flora-client's --data)",
    )
    validation_template: str = Field(
        "alpaca", min_length=1,
        description="prompt template of validation_data: chat (the tokenizer's chat template), alpaca, plain or a format string",
    )
    validation_data_format: Literal[DATA_FORMATS] = Field(
        "auto", description="record form of validation_data; auto: detected per file")
    validation_field: list[str] = Field(
        [], description="column mapping of validation_data FORM_KEY=YOUR_KEY, e.g. instruction=question (repeatable)")
    validation_cutoff: int = Field(256, ge=2, le=131072, description="tokens per validation example")
    validation_batch_size: int = Field(8, ge=1, le=4096, description="examples per evaluation batch")
    validation_mask_prompt: bool = Field(False, description="score only the response tokens of validation examples")
    # --- hints sent to clients (0 = client decides) ---------------------------------------
    local_steps: int = Field(
        0, ge=0, le=10_000_000,
        description="optimiser steps per round asked of clients; 0 = client decides",
    )
    local_epochs: float = Field(
        0.0, ge=0.0, le=10_000,
        description="local epochs per round asked of clients when local_steps is 0; 0 = client decides",
    )
    learning_rate: float = Field(
        0.0, ge=0.0, le=1.0,
        description="peak learning rate asked of clients; 0 = client decides",
    )
    batch_size: int = Field(0, ge=0, le=65536, description="micro-batch size asked of clients; 0 = client decides")
    # --- process --------------------------------------------------------------------------
    shutdown_grace_s: float = Field(
        10.0, ge=0.0, le=3600,
        description="seconds in-flight calls get to finish on SIGTERM/SIGINT",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="logging verbosity")

    @model_validator(mode="before")
    @classmethod
    def _uniform_weights_under_dp(cls, data: object) -> object:
        """Under DP the weights default to uniform: with example counts a holder's reported count
        moves every other holder's weight, which the noise covers only if the counts are public.
        An explicit ``weighting = "examples"`` is kept (README: the counts are then treated as public)."""
        if isinstance(data, dict) and data.get("dp_noise_multiplier") is not None and "weighting" not in data:
            return {**data, "weighting": ServerWeighting.UNIFORM}
        return data

    @field_validator("clients_per_round", mode="before")
    @classmethod
    def _selection_text(cls, value: object) -> str:
        """Accept 8 and 0.5 from TOML/YAML as well as text, and check the form once."""
        text = str(value).strip().lower() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        Selection.parse(text)  # raises ValueError naming the allowed forms
        return text

    @field_validator("validation_data", mode="before")
    @classmethod
    def _source_names(cls, value: object) -> object:
        # Not checked for existence here: flora.server.inputs reads it at start (a missing file is
        # named there), and --print-config works where the data is not yet present.
        return source_names(value)

    @field_validator("target_modules")
    @classmethod
    def _module_suffixes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        check_target_names(value)
        return sorted(set(value))

    @field_validator("enrollment_token", "operator_token")
    @classmethod
    def _token_length(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"{info.field_name} must be at least {MIN_TOKEN_CHARS} characters long")
        return value

    @field_validator("tls_key")
    @classmethod
    def _key_with_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("tls_cert") is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return value

    @field_validator("tls_client_ca")
    @classmethod
    def _ca_with_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("tls_cert") is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return value

    @field_validator("host")
    @classmethod
    def _tls_beyond_loopback(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("tls_cert") is None and not info.data.get("insecure") and not is_loopback(value):
            raise ValueError(
                f"host {value!r} is not a loopback address and TLS is off: set tls_cert and tls_key, "
                "or set insecure=true to serve plaintext deliberately"
            )
        return value

    @field_validator("client_timeout_s")
    @classmethod
    def _timeout_beyond_poll(cls, value: float, info: ValidationInfo) -> float:
        poll = info.data.get("long_poll_s")
        if poll is not None and value <= poll:
            raise ValueError(
                f"client_timeout_s ({value}) must exceed long_poll_s ({poll}): a long-polling client would count as lost"
            )
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return get_method(value).name  # raises ValueError listing the known methods

    @field_validator("lora_rank")
    @classmethod
    def _rank_within_max(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_rank")
        if limit is not None and value > limit:
            raise ValueError(f"lora_rank ({value}) must not exceed max_rank ({limit})")
        return value

    @field_validator("dp_noise_multiplier")
    @classmethod
    def _dp_can_run(cls, value: float | None, info: ValidationInfo) -> float | None:
        """A method or robustness rule whose output the private release cannot give is refused, with why."""
        if value is None:
            return None
        method = info.data.get("method")
        reason = None if method is None else get_method(method).dp_refusal
        if reason is not None:
            private = ", ".join(name for name, m in METHODS.items() if m.dp_refusal is None)
            raise ValueError(f"method {method} cannot run under differential privacy: {reason}; use one of {private}")
        for rule in ("clip_median_multiple", "reject_median_multiple"):
            if info.data.get(rule) is not None:
                raise ValueError(f"{rule} cannot be used under differential privacy: one client moves the round's "
                                 "median and so what every other client contributes, which no clip norm bounds")
        check_installed()  # the accountant states every round's epsilon
        return value

    @field_validator("dp_clip_norm")
    @classmethod
    def _dp_pair(cls, value: float | None, info: ValidationInfo) -> float | None:
        if (value is None) != (info.data.get("dp_noise_multiplier") is None) and "dp_noise_multiplier" in info.data:
            raise ValueError("dp_noise_multiplier (sigma) and dp_clip_norm (C) go together: the noise is sigma x C")
        return value

    @field_validator("dp_delta")
    @classmethod
    def _delta_below_one_client(cls, value: float | None, info: ValidationInfo) -> float | None:
        _dp_fields_need_dp("dp_delta", value, info)
        clients = info.data.get("min_clients")
        if value is not None and clients is not None and value >= 1.0 / clients:
            raise ValueError(f"dp_delta {value:g} must be below 1/min_clients ({1.0 / clients:.3g}): a delta "
                             "that large allows leaking one whole client")
        return value

    @field_validator("dp_target_epsilon")
    @classmethod
    def _target_reachable(cls, value: float | None, info: ValidationInfo) -> float | None:
        """A target that even the first round passes, at the clients the server is sure of, is unreachable."""
        _dp_fields_need_dp("dp_target_epsilon", value, info)
        data = info.data
        if value is None or data.get("dp_clip_norm") is None or any(data.get(f) is None for f in _TARGET_READS):
            return value  # DP off, or a field it reads was refused: that field's own error is reported
        population = data["min_clients"]
        per_round = Selection.parse(data["clients_per_round"]).size(population)
        delta = data.get("dp_delta") or default_delta(population)
        first = epsilon_after_rounds(data["dp_noise_multiplier"], population, per_round, 1,
                                     _mechanisms(data["method"], data["dp_release"]), delta,
                                     data["dp_accountant"])[0]
        if first > value:
            raise ValueError(
                f"dp_target_epsilon {value:g} is unreachable: the first round alone spends epsilon {first:.4g} "
                f"(delta {delta:.3g}, {per_round} of min_clients {population} per round); raise dp_noise_multiplier "
                "(flora-admin dp-plan --target-epsilon prints the one needed), min_clients, or the target")
        return value

    @field_validator("secure_aggregation")
    @classmethod
    def _secure_can_run(cls, value: bool, info: ValidationInfo) -> bool:
        """A method or rule that needs a single client's update is refused under secure aggregation, with why."""
        if not value:
            return value
        method = info.data.get("method")
        if method is not None:
            check_secure(get_method(method))  # ValueError naming the method and why
        for rule in ("clip_median_multiple", "reject_median_multiple"):
            if info.data.get(rule) is not None:
                raise ValueError(f"{rule} cannot be used with secure_aggregation: it needs each update's norm, which the "
                                 "server no longer sees (clip_norm is applied by each client instead)")
        if info.data.get("min_clients", 2) < 2 or Selection.parse(info.data.get("clients_per_round", "all")).size(2) < 2:
            raise ValueError("secure_aggregation needs at least 2 clients in every round (min_clients >= 2 and "
                             "clients_per_round not 1): the sum of one client is its update")
        return value

    @property
    def message_limit(self) -> int:
        """The largest gRPC message the server sends or receives: a piece plus its header, with room to spare."""
        return 2 * self.chunk_size + (1 << 20)

    @property
    def selection(self) -> Selection:
        """The parsed clients_per_round."""
        return Selection.parse(self.clients_per_round)

    @property
    def robust_policy(self) -> RobustPolicy:
        """The aggregation-time robustness rules."""
        return RobustPolicy(max_weight_share=self.max_weight_share if self.max_weight_share < 1 else None,
                            clip_norm=self.clip_norm, clip_median_multiple=self.clip_median_multiple,
                            reject_median_multiple=self.reject_median_multiple)

    @property
    def aggregation(self) -> AggregationMethod:
        """The run's method: what the server merges and keeps, what clients start from."""
        return get_method(self.method)

    @property
    def required_scaling(self) -> float:
        """Methods with one scaling (fedit, zeropad, fedex, ffa): the scaling every client must
        train with; 0 for the others."""
        if not self.aggregation.one_scaling:
            return 0.0
        return lora_scaling(self.lora_rank, self.lora_alpha, self.rslora)

    @property
    def downlink_policy(self) -> DownlinkPolicy:
        """The per-round downlink as the pure maths take it."""
        return DownlinkPolicy(
            energy=self.downlink_energy, max_rank=self.downlink_max_rank or None, dtype=WIRE_DTYPES[self.downlink_dtype]
        )

    @property
    def dp_enabled(self) -> bool:
        """Whether the run releases under client-level differential privacy (sigma and C both set)."""
        return self.dp_noise_multiplier is not None

    @property
    def dp_mechanisms_per_round(self) -> int:
        """Gaussian mechanisms a round releases: 2 for the sketch (Y, then P), 1 dense or ffa (summed B)."""
        return _mechanisms(self.method, self.dp_release)

    @property
    def dp_effective_delta(self) -> float:
        """dp_delta, or its default min(1e-5, 1/(10 min_clients)): min_clients is the population
        known before any client joins, and the cap keeps delta below 1/N up to 100,000 clients."""
        return self.dp_delta if self.dp_delta is not None else default_delta(self.min_clients)

    @property
    def global_lora_rank(self) -> int:
        """Methods with one scaling: rank of the persistent global LoRA; 0 for the others."""
        return self.lora_rank if self.aggregation.one_scaling else 0


_TARGET_READS = ("dp_noise_multiplier", "min_clients", "clients_per_round", "method", "rounds", "dp_release",
                 "dp_accountant")  # the fields dp_target_epsilon's first-round check reads


def _mechanisms(method: str, release: str) -> int:
    """ffa trains no A: its release is the summed B alone, one mechanism whatever dp_release says."""
    return release_passes(release, get_method(method).trains_a)


def _dp_fields_need_dp(name: str, value: object, info: ValidationInfo) -> None:
    if value is not None and info.data.get("dp_noise_multiplier") is None and "dp_noise_multiplier" in info.data:
        raise ValueError(f"{name} is set but differential privacy is off: set dp_noise_multiplier and dp_clip_norm")
