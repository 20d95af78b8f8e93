"""One simulated federated run: K clients and the server's aggregation in one process.

The round logic is the real system's (DESIGN.md section 2), asked of the method's module in
``flora.common.methods`` exactly as the server and the client daemon ask it: ``start`` says how
each client begins its round (``train_round`` applies it), ``merge`` gives the delta merged into
the global model and the LoRA kept for the next round. ``client_weights`` gives p_k and
``round_error`` measures each round against the exact FedAvg of the clients' trained models.

The model object always holds the fully merged global model (the base plus everything merged,
including a persistent global LoRA), and ``train_round`` leaves it unchanged, so one model
serves every client. The delta reaches the model through ``flora.sim.downlink`` (unchanged by
default; with ``SimConfig.downlink`` compressed as the server compresses it, remainder carried). ``centralized`` is one flora client of the largest rank trained on the
union of all clients' data, for as many steps per round as the round's clients take together:
the reference a federation tries to match.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from flora.client.trainer import TrainConfig, TrainResult, total_steps
from flora.common.basemodel import target_module_shapes
from flora.common.data import TokenizedExample
from flora.common.evaluate import evaluate_loss
from flora.common.lora import LoraAdapter
from flora.common.merge import merge_into_model
from flora.common.methods import METHODS as AGGREGATION_METHODS
from flora.common.methods import AggregationMethod, ClientStart, RoundResult, get_method, round_error
from flora.common.privacy.private_round import Privacy, private_round
from flora.common.robust import RobustPolicy
from flora.common.downlink import DownlinkPolicy
from flora.common.devices import resolve_device
from flora.common.quantize import QUANTIZATIONS
from flora.common.weights import Weighting, client_weights
from flora.sim.backends import Backend, Job, LocalBackend
from flora.sim.bases import FULL, QuantizedBases, client_bases
from flora.sim.downlink import DownlinkChannel

CENTRALIZED = "centralized"
METHODS = (*AGGREGATION_METHODS, CENTRALIZED)


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2^31) from a tuple, stable across processes (string seeding hashes with sha512)."""
    return random.Random("/".join(map(str, parts))).getrandbits(31)


@dataclass(frozen=True)
class ClientData:
    """One simulated client: its name and its tokenised local training data."""

    name: str
    train: list[TokenizedExample]


@dataclass(frozen=True)
class SimConfig:
    """One method's run. ``local`` holds the local hyper-parameters; rank and seed are set per client."""

    method: str
    ranks: tuple[int, ...]  # one per client
    rounds: int
    local: TrainConfig = field(default_factory=lambda: TrainConfig(device="cpu"))
    weighting: Weighting = Weighting.EXAMPLES
    clients_per_round: int | None = None  # None: every client, every round
    seed: int = 0
    eval_batch_size: int = 16
    downlink: DownlinkPolicy = DownlinkPolicy()  # how each round's delta reaches the models (flora.sim.downlink)
    bases: tuple[str, ...] = ()  # each client's base (flora.sim.bases): none, nf4, fp4 or int8; empty: all none
    privacy: Privacy | None = None  # client-level DP: each round is a private release (flora.common.privacy.private_round)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be one integer >= 1 per client, got {list(self.ranks)}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        scalings = [local_config(self, rank, 0).scaling for rank in self.ranks]  # validates every rank
        self.aggregation.validate(list(self.ranks), scalings)
        if self.bases and client_bases(self.bases, len(self.ranks)) != self.bases:
            raise ValueError(f"bases must be one of {', '.join(QUANTIZATIONS)} per client, got {list(self.bases)}")
        if self.privacy is not None and self.aggregation.dp_refusal is not None:
            raise ValueError(f"{self.method} cannot run under differential privacy: {self.aggregation.dp_refusal}")
        per_round = self.clients_per_round
        if per_round is not None and not 1 <= per_round <= len(self.ranks):
            raise ValueError(f"clients_per_round must be between 1 and the {len(self.ranks)} clients, got {per_round}")

    @property
    def aggregation(self) -> AggregationMethod:
        """The method asked every round (centralized: flora with one client)."""
        return get_method("flora" if self.method == CENTRALIZED else self.method)


@dataclass(frozen=True)
class RoundRecord:
    """One line of the run's history; round 0 is the starting model, before any training."""

    method: str
    round: int
    clients: list[int]  # the round's clients (centralized: those whose steps it takes, on all data)
    ranks: list[int]  # the rank each of them trained
    global_rank: int | None  # rank of the LoRA kept for the next round; None when nothing is kept
    validation_loss: float | None  # of the global model after the round
    train_loss: float | None  # plain mean over the round's clients of their mean step loss
    aggregation_error: float | None  # |delta - sum p_k (s_k B_k A_k - removed_k)|_F / |sum p_k (...)|_F
    seconds: float  # wall time of the round: training, aggregation, merge, evaluation
    seed: int = 0
    downlink: dict | None = None  # a lossy downlink's figures (ranks sent, retained energy, remainder norm)

    def to_json(self) -> dict:
        """The record as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class RoundOutcome:
    """A round's record plus the tensors behind it, for tests and for callers that inspect them."""

    record: RoundRecord
    updates: list[LoraAdapter]  # the clients' adapters, in ``record.clients`` order
    weights: list[float]  # their p_k
    starts: list[ClientStart]  # how each of them started the round
    delta: LoraAdapter | None  # what was merged into the global model (None at round 0)
    kept: LoraAdapter | None  # the global LoRA the next round starts from (round 0: the method's initial one)


def select_clients(count: int, per_round: int | None, seed: int, number: int) -> list[int]:
    """The clients of round ``number``: all, or a seeded sample that every method shares."""
    if per_round is None or per_round >= count:
        return list(range(count))
    return sorted(random.Random(derive_seed(seed, "select", number)).sample(range(count), per_round))


def local_config(config: SimConfig, rank: int, seed: int, **overrides: object) -> TrainConfig:
    """The template's local hyper-parameters with this client's rank and seed (validated again)."""
    return TrainConfig(**{**config.local.model_dump(), "rank": rank, "seed": seed, **overrides})


def _jobs(
    clients: Sequence[ClientData], selected: list[int], number: int, config: SimConfig, kept: LoraAdapter | None
) -> list[Job]:
    """Round ``number``'s local training: each selected client as its method starts it, or the centralized learner."""
    method = config.aggregation
    if config.method != CENTRALIZED:
        jobs = []
        for k in selected:
            local = local_config(config, config.ranks[k], derive_seed(config.seed, "client", k, number), round=number,
                                 rounds=config.rounds)
            base = config.bases[k] if config.bases else FULL
            jobs.append(Job(clients[k].train, local, method.start(kept, local.rank, local.scaling), base))
        return jobs
    # As many optimiser steps as the round's clients take together (steps or epochs alike).
    steps = sum(total_steps(len(clients[k].train), local_config(config, config.ranks[k], 0)) for k in selected)
    union = [example for client in clients for example in client.train]
    central = local_config(config, max(config.ranks), derive_seed(config.seed, CENTRALIZED, number), max_steps=steps,
                           round=number, rounds=config.rounds)
    return [Job(union, central, method.start(kept, central.rank, central.scaling))]


def _initial(model: nn.Module, config: SimConfig) -> LoraAdapter | None:
    """The method's version-0 global LoRA, at the largest rank and the run's common scaling."""
    shapes = target_module_shapes(model, config.local.target_modules)
    rank = max(config.ranks)
    return config.aggregation.initial(shapes, rank, local_config(config, rank, 0).scaling, derive_seed(config.seed, "global-lora"))


def _evaluate(model: nn.Module, validation: Sequence[TokenizedExample], config: SimConfig) -> float | None:
    return evaluate_loss(model, validation, batch_size=config.eval_batch_size) if validation else None


def _aggregate(
    config: SimConfig, number: int, kept: LoraAdapter | None, updates: list[LoraAdapter], weights: list[float],
    removed: list[LoraAdapter | None],
) -> tuple[RoundResult, float | None]:
    """The round's result and its error against the exact FedAvg; under DP the private release's
    result and no error (it is noisy by design, and nothing published compares with clear updates)."""
    method = config.aggregation
    if config.privacy is None:
        merged = method.merge(kept, updates, weights)
        return merged, round_error(merged.delta, updates, weights, removed)
    merged, _, _ = private_round(method, kept, updates, weights, RobustPolicy(max_weight_share=None), config.privacy, number)
    return merged, None


def run_method(
    model: nn.Module,
    clients: Sequence[ClientData],
    validation: Sequence[TokenizedExample],
    config: SimConfig,
    backend: Backend | None = None,
) -> Iterator[RoundOutcome]:
    """Run ``config.rounds`` rounds and yield each one's outcome, starting with round 0 (no training).

    ``model`` becomes the global model and is changed in place (pass a fresh copy of the base).
    Everything is seeded from ``config.seed``: client k gets the same seed in round t under every
    method, so methods differ by their method alone. ``backend`` (default: in turn, here) runs
    each round's local training.
    """
    if len(clients) != len(config.ranks):
        raise ValueError(f"{len(config.ranks)} ranks given for {len(clients)} clients")
    backend = backend or LocalBackend()
    method = config.aggregation
    channel = DownlinkChannel(config.downlink)
    start = time.perf_counter()
    bases = QuantizedBases(model, config.bases, config.local.target_modules, config.local.dtype,
                           resolve_device(config.local.device))  # from the base, before anything is merged
    kept = _initial(model, config)
    if kept is not None:
        merge_into_model(model, kept)  # the global model is the base plus the global LoRA
        bases.apply_adapter(kept)
    record = RoundRecord(
        config.method, 0, [], [], None if kept is None else kept.rank, _evaluate(model, validation, config),
        None, None, time.perf_counter() - start, config.seed,
    )
    yield RoundOutcome(record, [], [], [], None, kept)
    for number in range(1, config.rounds + 1):
        start = time.perf_counter()
        selected = select_clients(len(clients), config.clients_per_round, config.seed, number)
        jobs = _jobs(clients, selected, number, config, kept)
        results: list[TrainResult] = backend.train(model, jobs, bases.models())
        updates = [result.adapter for result in results]
        weights = client_weights([result.num_examples for result in results], config.weighting)
        merged, error = _aggregate(config, number, kept, updates, weights, [job.start.removed for job in jobs])
        downlink = channel.merge(model, merged.delta, bases)
        kept = merged.kept
        record = RoundRecord(
            config.method, number, selected, [u.rank for u in updates], None if kept is None else kept.rank,
            _evaluate(model, validation, config), sum(r.train_loss for r in results) / len(results), error,
            time.perf_counter() - start, config.seed, downlink,
        )
        yield RoundOutcome(record, updates, weights, [job.start for job in jobs], merged.delta, kept)
