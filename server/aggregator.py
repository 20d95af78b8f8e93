"""The server's copy of the model and the work done with it: aggregate, merge, export, evaluate.

Everything here is blocking torch or file work; the coordinator calls it through
``asyncio.to_thread`` so that the event loop keeps serving while a round is aggregated. Nothing
here touches the database: methods return what they wrote, and the caller commits it.

Every method (``flora.common.methods``) works the same way here: the model holds base + every
committed downlink update. The method's ``merge`` gives the round's delta, which is factored into
its downlink (``flora.common.downlink``: canonical factors or dense per module, optionally
compressed); the server merges exactly the downlink it serves, and a lossy downlink's remainder is
kept (in memory and in the state directory) for the next round. The global LoRA a method keeps
for the next round's starts is written as the version's GLOBAL_LORA and read back from that file,
so the server computes every client's start from exactly the bytes the clients download.
Under client-level differential privacy the method's result comes from a noisy release of the
clipped updates instead (``flora.common.privacy.private_round``), and all of the above from it.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from flora.common.architectures import fan_in_fan_out, target_suffixes
from flora.common.basemodel import fingerprint, target_module_shapes
from flora.common.evaluate import evaluate_loss
from flora.common.devices import resolve_device
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling
from flora.common.downlink import plan_downlink
from flora.common.merge import merge_update_in_place, merged_weights, module_weights
from flora.common.methods import ClientStart, RoundResult, round_error
from flora.common.methods.base import clipped_stack
from flora.common.payload import (
    PayloadLimits,
    PayloadMeta,
    read_adapter,
    read_update,
    read_weights,
    write_adapter,
    write_update,
    write_weights,
)
from flora.common.robust import Decision, robust_inputs, weights_norm
from flora.common.update import ModuleUpdate, cumulative_factors
from flora.common.weights import client_weights
from flora.server.config import ServerSettings
from flora.server.export import save_checkpoint
from flora.server.inputs import ConfigurationError, load_base, load_validation
from flora.server.layout import Layout
from flora.common.privacy.private_round import Privacy, private_round
from flora.server.store import Artifact, Submission
from flora.server.uploads import is_rslora

log = logging.getLogger(__name__)

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _timed(seconds: dict[str, float], label: str, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, with its wall time recorded under ``label`` for the round history."""
    clock = time.perf_counter()
    try:
        return work(*args)
    finally:
        seconds[label] = time.perf_counter() - clock


@dataclass(frozen=True)
class RoundOutput:
    """What aggregating one round wrote and measured, for the commit and the history."""

    artifacts: list[Artifact]
    weights: list[float]
    aggregation_error: float
    global_rank: int
    downlink: dict[str, Any]  # forms, ranks, bytes, retained energy, remainder norm
    validation_loss: float | None
    checkpoint: str | None
    seconds: dict[str, float]
    decisions: list[Decision]  # per submission: norm, weight cap, clipping, rejection
    secure: dict[str, Any] | None = None  # secure aggregation's survivors, bytes and seconds per stage


class Aggregator:
    """The model copy, the run's target modules, and the per-round aggregation."""

    def __init__(self, settings: ServerSettings, layout: Layout) -> None:
        self.settings = settings
        self.layout = layout
        self.method = settings.aggregation
        self.device = resolve_device(settings.merge_device)
        self.precision = DTYPES[settings.precision]
        self.model, self.tokenizer = load_base(settings, DTYPES[settings.model_dtype], self.device)
        try:
            self.target_modules = target_suffixes(self.model, settings.target_modules)  # the family's default, all-linear expanded
            self.shapes = target_module_shapes(self.model, self.target_modules)
        except ValueError as err:  # it names target_modules
            raise ConfigurationError(str(err)) from None
        self.fingerprint = fingerprint(self.model, self.shapes)
        self.limits = PayloadLimits(max_bytes=settings.max_update_bytes, max_rank=settings.max_rank)
        self.base_norm = weights_norm(module_weights(self.model, list(self.shapes)))  # the same limit after every restart
        self.kept: LoraAdapter | None = None  # the method's global LoRA at the current version, as served
        self.remainder: dict[str, ModuleUpdate] = {}  # what earlier lossy downlinks did not send
        self.validation = load_validation(settings, self.tokenizer)
        log.info("model %s on %s: %d target modules, fingerprint %s",
                 settings.base_model, self.device, len(self.shapes), self.fingerprint[:12])

    @property
    def max_update_norm(self) -> float:
        """The largest |s B A|_F an upload may have: as configured, else relative to the base weights."""
        if self.settings.max_update_norm is not None:
            return self.settings.max_update_norm
        return self.settings.max_update_norm_ratio * self.base_norm

    @property
    def upload_norm_limit(self) -> float:
        """The norm above which an upload is refused: ``max_update_norm``, none under DP. There the
        clip to dp_clip_norm bounds every contribution, and a refusal by norm would make whether a
        client takes part depend on its data, which the release does not account (nor would the
        bias it adds be noise)."""
        return math.inf if self.settings.dp_enabled else self.max_update_norm

    def start_of(self, rank: int, scaling: float) -> ClientStart:
        """How a client of ``rank`` and ``scaling`` starts from the current kept LoRA: what the
        server checks its upload against, and what the method's merge removes (one
        ``method.start`` per kept LoRA and rank, ``AggregationMethod.cached_start``)."""
        return self.method.cached_start(self.kept, rank, scaling)

    # --- version 0 and restart ---------------------------------------------------------------

    def initial(self) -> tuple[list[Artifact], float | None]:
        """Write version 0's artifacts: the base weights, and the method's seeded global LoRA if any.

        A version-0 global LoRA has B = 0 (PEFT's init), so version 0 is the base model itself.
        """
        artifacts = [self._write_merged(0)]
        kept = self.method.initial(self.shapes, self.settings.lora_rank, self.settings.required_scaling, self.settings.seed)
        if kept is not None:
            artifacts.append(self._write_kept(kept, 0))
        return artifacts, self.evaluate()

    def restore(self, version: int, artifacts: dict[str, Artifact]) -> None:
        """Bring the in-memory state to committed ``version`` after a restart."""
        self._load_merged(self.layout.absolute(artifacts["merged"].path))
        self.remainder = {}
        if "remainder" in artifacts:
            self.remainder, _ = read_update(self.layout.absolute(artifacts["remainder"].path), self.shapes)
        self.kept = self._read_kept(self.layout.absolute(artifacts["lora"].path)) if "lora" in artifacts else None
        log.info("restored the model state of version %d", version)

    # --- one round ----------------------------------------------------------------------------

    def aggregate(self, number: int, submissions: Sequence[Submission]) -> RoundOutput:
        """Aggregate a closed round's updates into version ``number`` and write its artifacts.

        On any failure the in-memory model is put back to version ``number - 1``, so the round
        can simply be aggregated again.
        """
        clock = time.perf_counter()
        loaded = [self._load_update(s).to(device=self.device) for s in submissions]
        claimed = client_weights([s.num_examples for s in submissions], self.settings.weighting.value)
        seconds = {"load": time.perf_counter() - clock}
        clock = time.perf_counter()
        merge = self._private_merge if self.settings.dp_enabled else self._merge
        result, weights, error, decisions = merge(number, loaded, claimed)
        delta = _unit_scaling(result.delta).to(torch.float32)
        seconds["aggregate"] = time.perf_counter() - clock
        return self.write_round(number, result, decisions, error, seconds)

    def write_round(self, number: int, result: RoundResult, decisions: list[Decision], error: float,
                    seconds: dict[str, float]) -> RoundOutput:
        """Write version ``number`` from the round's merged ``result`` (the plain merge's, or the
        one secure aggregation computed from sums alone): downlink, model, kept LoRA, evaluation."""
        delta = _unit_scaling(result.delta).to(device=self.device, dtype=torch.float32)
        kept = None if result.kept is None else result.kept.to(device=self.device)
        previous = self.kept, self.remainder
        try:
            artifacts, downlink = self._apply(number, delta, kept, seconds)
            checkpoint = _timed(seconds, "checkpoint", self._checkpoint, number) if self._checkpoint_due(number) else None
            loss = _timed(seconds, "evaluate", self.evaluate)
        except BaseException:
            self.restore_previous(number - 1, *previous)
            for path in (self.layout.global_artifact(number), self.layout.downlink(number),
                         self.layout.remainder(number), self.layout.merged(number)):
                path.unlink(missing_ok=True)  # never recorded: no orphan of a failed round stays
            shutil.rmtree(self.layout.checkpoint(number), ignore_errors=True)
            raise
        return RoundOutput(artifacts, [d.weight for d in decisions], error, delta.rank, downlink, loss, checkpoint,
                           seconds, decisions)

    def _merge(
        self, number: int, loaded: list[LoraAdapter], claimed: list[float]
    ) -> tuple[RoundResult, list[float], float, list[Decision]]:
        """The round's result from the clear updates (robustness rules, the method's merge), its
        weights, its error against the exact FedAvg of the clients' models, and the decisions."""
        inits = [self.start_of(u.rank, u.scaling).init for u in loaded]  # norms and clipping are of the change
        adapters, weights, clips, decisions = robust_inputs(loaded, inits, claimed, self.settings.robust_policy)
        result = self.method.merge(self.kept, adapters, weights, self.precision, clips)
        starts = [self.start_of(u.rank, u.scaling) for u in adapters]  # as each client started
        counted = [clipped_stack([u], [1.0], [s.init], clips=[c]) for u, s, c in zip(adapters, starts, clips)]
        error = round_error(_unit_scaling(result.delta).to(torch.float32), counted, weights, [s.removed for s in starts])
        return result, weights, error, decisions

    def _private_merge(
        self, number: int, loaded: list[LoraAdapter], claimed: list[float]
    ) -> tuple[RoundResult, list[float], float, list[Decision]]:
        """As ``_merge``, under client-level DP (``flora.common.privacy.private_round``): the result comes
        from the noisy release alone; no error against the clear updates (NaN: null in the history)."""
        settings = self.settings
        privacy = Privacy(settings.dp_noise_multiplier, settings.dp_clip_norm, settings.dp_release, settings.seed)
        result, clipped, _ = private_round(self.method, self.kept, loaded, claimed, settings.robust_policy, privacy, number)
        return result, clipped.weights, math.nan, clipped.decisions

    def faulty(self, submissions: Sequence[Submission]) -> dict[str, str]:
        """The updates that fail on their own (unreadable, or non-finite merged alone), with why.

        What a failed aggregation is blamed on: each update is re-read and merged into a copy of
        the current weights by itself; the model is not changed. Under DP an update is only
        re-read (finite, of the run's shapes): the round merges its clipped change, never the
        update itself, so an update that overflows alone is no fault of the round, and leaving it
        out for its size would make taking part depend on the data.
        """
        live = module_weights(self.model, list(self.shapes))
        reasons = {}
        for submission in submissions:
            try:
                update = self._load_update(submission)
                if not self.settings.dp_enabled:
                    merged_weights(live, update, self.precision)
            except (ValueError, FileNotFoundError) as error:  # PayloadError is a ValueError
                reasons[submission.client_id] = f"{type(error).__name__}: {error}"
        return reasons

    def _apply(
        self, number: int, delta: LoraAdapter, kept: LoraAdapter | None, seconds: dict[str, float]
    ) -> tuple[list[Artifact], dict[str, Any]]:
        """Write version ``number``'s artifacts and move the model state to it."""
        downlink = _timed(seconds, "factorize", plan_downlink, delta.pairs, self.remainder, self.settings.downlink_policy)
        clock = time.perf_counter()
        artifacts = [self._write_update("global", "global_update", downlink.update, number)]
        if downlink.remainder:
            artifacts.append(self._write_update("remainder", "downlink_remainder", downlink.remainder, number))
        live = module_weights(self.model, list(self.shapes))
        merge_update_in_place(live, downlink.update, self.precision)  # exactly what is served; all or none
        self.remainder = downlink.remainder
        artifacts.append(self._write_merged(number))
        if kept is not None:
            artifacts.append(self._write_kept(kept, number))
        else:
            self.kept = None
        seconds["merge"] = time.perf_counter() - clock
        return artifacts, {"bytes": artifacts[0].size, **downlink.summary()}

    def restore_previous(
        self, version: int, previous_kept: LoraAdapter | None, previous_remainder: dict[str, ModuleUpdate]
    ) -> None:
        """Undo a failed round: reload the merged weights of ``version``, its global LoRA and remainder."""
        self._load_merged(self.layout.merged(version))
        self.remainder = previous_remainder
        self.kept = previous_kept

    def _load_merged(self, path: Path) -> None:
        """Set the model's target modules to merged weights written by ``_write_merged``."""
        weights, _ = read_weights(path, self.shapes)
        with torch.no_grad():
            for name, live in module_weights(self.model, list(self.shapes)).items():
                live.copy_(weights[name])

    def _load_update(self, submission: Submission) -> LoraAdapter:
        """An accepted update, revalidated from disk, with the scaling its header declared; when
        the method freezes A the file holds B alone and A is the client's start's (kept A[:r])."""
        scaling = lora_scaling(submission.rank, submission.alpha, is_rslora(submission.scaling_rule))
        start = self.start_of(submission.rank, scaling)
        adapter, _ = read_adapter(
            self.layout.absolute(submission.path), self.shapes, rank=submission.rank, scaling=scaling, limits=self.limits,
            frozen_a=None if start.train_a else start.init,
        )
        return adapter

    # --- files ----------------------------------------------------------------------------------

    def _artifact(self, kind: str, version: int, path: Path, size_sha: tuple[int, str]) -> Artifact:
        size, sha = size_sha
        return Artifact(kind, version, self.layout.relative(path), sha, size)

    def _write_update(self, kind: str, payload_kind: str, update: dict[str, ModuleUpdate], version: int) -> Artifact:
        """The downlink ("global") or the carried remainder ("remainder") of a version."""
        path = self.layout.downlink(version) if kind == "global" else self.layout.remainder(version)
        meta = PayloadMeta(payload_kind, round=version, version=version)
        return self._artifact(kind, version, path, write_update(path, update, meta))

    def _write_kept(self, adapter: LoraAdapter, version: int) -> Artifact:
        """Write the method's global LoRA of ``version`` (GLOBAL_LORA) and keep it as clients will read it."""
        if self.method.one_scaling:  # the run's rank, alpha and rule (what Join checks clients against)
            alpha, rule = self.settings.lora_alpha, "rslora" if self.settings.rslora else "standard"
        else:  # a stacking method's canonical factors: scaling 1
            alpha, rule = adapter.scaling * adapter.rank, "standard"
        meta = PayloadMeta("global_lora", rank=adapter.rank, alpha=alpha, scaling_rule=rule, round=version, version=version)
        path = self.layout.global_artifact(version)
        artifact = self._artifact("lora", version, path, write_adapter(path, adapter, meta, torch.float32))
        self.kept = self._read_kept(path)
        return artifact

    def _read_kept(self, path: Path) -> LoraAdapter:
        """A stored global LoRA, read as a client reads its download, on the merge device."""
        adapter, _ = read_adapter(path, self.shapes)
        return adapter.to(device=self.device)

    def _write_merged(self, version: int) -> Artifact:
        path = self.layout.merged(version)
        weights = module_weights(self.model, list(self.shapes))
        written = write_weights(path, weights, PayloadMeta("merged_modules", version=version))
        return self._artifact("merged", version, path, written)

    # --- exports and evaluation -------------------------------------------------------------------

    def _checkpoint_due(self, number: int) -> bool:
        every = self.settings.checkpoint_every
        return number >= self.settings.rounds or (every > 0 and number % every == 0)

    def _checkpoint(self, version: int) -> str:
        dest = self.layout.checkpoint(version)
        save_checkpoint(self.model, self.tokenizer, dest, self.layout.tmp, self._peft_adapter(version))
        log.info("round %d: saved the merged checkpoint %s", version, dest)
        return self.layout.relative(dest)

    def _peft_adapter(self, version: int) -> dict:
        """The cumulative update as a PEFT adapter, exact for every method: the canonical factors
        of the sum of every downlink so far (what the model holds), so its rank per module is
        bounded by min(d_out, d_in) however many rounds ran.
        """
        updates = (read_update(self.layout.downlink(v), self.shapes)[0] for v in range(1, version + 1))
        return {"adapter": cumulative_factors(updates), "target_modules": self.target_modules,
                "base_model": self.settings.base_model, "fan_in_fan_out": fan_in_fan_out(self.model, self.shapes)}

    def evaluate(self) -> float | None:
        """Loss of the global model on the validation data, when the run has any."""
        if self.validation is None:
            return None
        return evaluate_loss(self.model, self.validation, batch_size=self.settings.validation_batch_size, device=self.device)


def _unit_scaling(adapter: LoraAdapter) -> LoraAdapter:
    """The same update with its scaling folded into A (the downlink's factors have scaling 1)."""
    if adapter.scaling == 1.0:
        return adapter
    return LoraAdapter({n: LoraPair(p.a * adapter.scaling, p.b) for n, p in adapter.pairs.items()}, 1.0)
