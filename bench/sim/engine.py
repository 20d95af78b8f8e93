"""One simulated federated run: K clients and the server's aggregation in one process, in turn.

The round logic is the real system's (DESIGN.md section 2) built from the very functions the
daemons call, so that what the simulation measures is what a deployment would do:
``train_lora`` for local training, ``client_weights`` for p_k, ``aggregate`` and
``aggregation_error`` for the server's step, ``merge_into_model`` for flora's merge, and
``seeded_lora`` / ``pad_rank`` for the persistent fedit/zeropad LoRA, as the server builds it.

- flora: every selected client trains a FRESH LoRA of its own rank on the current global model;
  the stacked adapter is merged into it. All clients hold the same global model, and
  ``train_lora`` leaves the model unchanged, so one model object serves every client.
- fedit / zeropad: a global LoRA of the run's global rank, seeded once; each client starts from
  it (``train_lora`` takes its leading r_k rows/columns) and the aggregate replaces it. The base
  is never changed; evaluation merges the global LoRA in temporarily.
- centralized: one LoRA of the largest client rank trained on the union of all clients' data,
  for as many steps per round as the round's clients take together, merged each round: a
  one-client flora, the reference a federation tries to match.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from flora.client.trainer import TrainConfig, TrainResult, total_steps, train_lora
from flora.common.aggregation import Method, aggregate, aggregation_error
from flora.common.basemodel import target_module_shapes
from flora.common.data import TokenizedExample
from flora.common.evaluate import evaluate_loss
from flora.common.lora import LoraAdapter, pad_rank, seeded_lora
from flora.common.merge import merge_into_model, merged_temporarily
from flora.common.weights import Weighting, client_weights

CENTRALIZED = "centralized"
METHODS = (Method.FLORA.value, Method.FEDIT.value, Method.ZEROPAD.value, CENTRALIZED)


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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be one integer >= 1 per client, got {list(self.ranks)}")
        if self.method == Method.FEDIT.value and len(set(self.ranks)) != 1:
            raise ValueError(f"fedit averages A and B separately, so every client needs the same rank; got {list(self.ranks)}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        scalings = {local_config(self, rank, 0).scaling for rank in set(self.ranks)}  # validates every rank
        if self.method in (Method.FEDIT.value, Method.ZEROPAD.value):
            if len(scalings) != 1:
                raise ValueError(
                    f"{self.method} needs one LoRA scaling for every client; ranks {list(self.ranks)} give {sorted(scalings)}"
                )
        per_round = self.clients_per_round
        if per_round is not None and not 1 <= per_round <= len(self.ranks):
            raise ValueError(f"clients_per_round must be between 1 and the {len(self.ranks)} clients, got {per_round}")

    @property
    def global_rank(self) -> int | None:
        """Rank of the persistent global LoRA (fedit, zeropad) or of the centralized LoRA; None for flora."""
        return None if self.method == Method.FLORA.value else max(self.ranks)

    @property
    def merges(self) -> bool:
        """Whether each round's aggregate is merged into the model (else it replaces the global LoRA)."""
        return self.method in (Method.FLORA.value, CENTRALIZED)


@dataclass(frozen=True)
class RoundRecord:
    """One line of the run's history; round 0 is the starting model, before any training."""

    method: str
    round: int
    clients: list[int]  # the round's clients (centralized: those whose steps it takes, on all data)
    ranks: list[int]  # the rank each of them trained
    global_rank: int | None  # rank of the round's aggregate (flora: the sum of the ranks)
    validation_loss: float | None  # of the global model after the round
    train_loss: float | None  # plain mean over the round's clients of their mean step loss
    aggregation_error: float | None  # |aggregate - sum p_k s_k B_k A_k|_F / |sum p_k s_k B_k A_k|_F
    seconds: float  # wall time of the round: training, aggregation, merge, evaluation

    def to_json(self) -> dict:
        """The record as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class RoundOutcome:
    """A round's record plus the tensors behind it, for tests and for callers that inspect them."""

    record: RoundRecord
    updates: list[LoraAdapter]  # the clients' adapters, in ``record.clients`` order
    weights: list[float]  # their p_k
    # What the server built from them (after zeropad's padding); at round 0 the seeded global
    # LoRA of fedit/zeropad, None for flora and centralized.
    aggregate: LoraAdapter | None


def select_clients(count: int, per_round: int | None, seed: int, number: int) -> list[int]:
    """The clients of round ``number``: all, or a seeded sample that every method shares."""
    if per_round is None or per_round >= count:
        return list(range(count))
    return sorted(random.Random(derive_seed(seed, "select", number)).sample(range(count), per_round))


def local_config(config: SimConfig, rank: int, seed: int, **overrides: object) -> TrainConfig:
    """The template's local hyper-parameters with this client's rank and seed (validated again)."""
    return TrainConfig(**{**config.local.model_dump(), "rank": rank, "seed": seed, **overrides})


def evaluate_global(
    model: nn.Module, global_lora: LoraAdapter | None, validation: Sequence[TokenizedExample], batch_size: int
) -> float | None:
    """Validation loss of the global model: ``model``, with the global LoRA merged when there is one."""
    if not validation:
        return None
    if global_lora is None:
        return evaluate_loss(model, validation, batch_size=batch_size)
    with merged_temporarily(model, global_lora):
        return evaluate_loss(model, validation, batch_size=batch_size)


def _train_clients(
    model: nn.Module,
    clients: Sequence[ClientData],
    selected: list[int],
    number: int,
    config: SimConfig,
    global_lora: LoraAdapter | None,
) -> list[TrainResult]:
    """Local training of round ``number``: each selected client in turn, or the centralized learner."""
    if config.method != CENTRALIZED:
        return [
            train_lora(
                model, clients[k].train, local_config(config, config.ranks[k], derive_seed(config.seed, "client", k, number)),
                init=global_lora,
            )
            for k in selected
        ]
    # As many optimiser steps as the round's clients take together (steps or epochs alike).
    steps = sum(total_steps(len(clients[k].train), local_config(config, config.ranks[k], 0)) for k in selected)
    union = [example for client in clients for example in client.train]
    central = local_config(config, config.global_rank, derive_seed(config.seed, CENTRALIZED, number), max_steps=steps)
    return [train_lora(model, union, central)]


def _combine(config: SimConfig, updates: list[LoraAdapter], weights: list[float]) -> LoraAdapter:
    """The server's aggregate; zeropad's is padded back to the global rank, as the server does."""
    method = Method.FLORA if config.method == CENTRALIZED else Method(config.method)
    combined = aggregate(method, updates, weights)
    if method is Method.ZEROPAD:
        combined = pad_rank(combined, config.global_rank)
    return combined


def run_method(
    model: nn.Module, clients: Sequence[ClientData], validation: Sequence[TokenizedExample], config: SimConfig
) -> Iterator[RoundOutcome]:
    """Run ``config.rounds`` rounds and yield each one's outcome, starting with round 0 (no training).

    flora and centralized merge into ``model`` in place (pass a fresh copy of the base); fedit and
    zeropad leave it as it was. Everything is seeded from ``config.seed``: client k gets the same
    seed in round t under every method, so methods differ by their method alone.
    """
    if len(clients) != len(config.ranks):
        raise ValueError(f"{len(config.ranks)} ranks given for {len(clients)} clients")
    global_lora = None
    if config.method in (Method.FEDIT.value, Method.ZEROPAD.value):
        shapes = target_module_shapes(model, config.local.target_modules)
        scaling = local_config(config, config.global_rank, 0).scaling  # one scaling, shared by every client
        global_lora = seeded_lora(shapes, config.global_rank, scaling, derive_seed(config.seed, "global-lora"))
    start = time.perf_counter()
    loss = evaluate_global(model, global_lora, validation, config.eval_batch_size)
    rank = None if global_lora is None else global_lora.rank
    yield RoundOutcome(
        RoundRecord(config.method, 0, [], [], rank, loss, None, None, time.perf_counter() - start), [], [], global_lora
    )
    for number in range(1, config.rounds + 1):
        start = time.perf_counter()
        selected = select_clients(len(clients), config.clients_per_round, config.seed, number)
        results = _train_clients(model, clients, selected, number, config, global_lora)
        updates = [result.adapter for result in results]
        weights = client_weights([result.num_examples for result in results], config.weighting)
        combined = _combine(config, updates, weights)
        error = aggregation_error(combined, updates, weights)
        if config.merges:
            merge_into_model(model, combined)
        else:
            global_lora = combined
        loss = evaluate_global(model, global_lora, validation, config.eval_batch_size)
        train_loss = sum(result.train_loss for result in results) / len(results)
        ranks = [update.rank for update in updates]
        record = RoundRecord(
            config.method, number, selected, ranks, combined.rank, loss, train_loss, error, time.perf_counter() - start
        )
        yield RoundOutcome(record, updates, weights, combined)
