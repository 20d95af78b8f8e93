"""The server's copy of the model and the work done with it: aggregate, merge, export, evaluate.

Everything here is blocking torch or file work; the coordinator calls it through
``asyncio.to_thread`` so that the event loop keeps serving while a round is aggregated. Nothing
here touches the database: methods return what they wrote, and the caller commits it.

flora: the model holds base + every committed global adapter (merged each round).
fedit / zeropad: the model holds the base; the persistent global LoRA is kept beside it and is
merged only into exports and evaluations (DESIGN.md section 2).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from flora.common.aggregation import Method, aggregate, aggregation_error
from flora.common.basemodel import fingerprint, load_model, load_tokenizer, target_module_shapes
from flora.common.data import TokenizedExample, load_examples, tokenize_examples
from flora.common.evaluate import evaluate_loss
from flora.common.devices import resolve_device
from flora.common.lora import LoraAdapter, lora_scaling, pad_rank, seeded_lora
from flora.common.merge import merged_temporarily, merged_weights, module_weights
from flora.common.payload import PayloadLimits, PayloadMeta, artifact_limits, read_adapter, read_weights, write_adapter, write_weights
from flora.common.robust import Decision, robust_inputs, weights_norm
from flora.common.weights import client_weights
from flora.server.config import ServerSettings
from flora.server.export import concatenate, save_checkpoint
from flora.server.layout import Layout
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
    validation_loss: float | None
    checkpoint: str | None
    seconds: dict[str, float]
    decisions: list[Decision]  # per submission: norm, weight cap, clipping, rejection


class Aggregator:
    """The model copy, the run's target modules, and the per-round aggregation."""

    def __init__(self, settings: ServerSettings, layout: Layout) -> None:
        self.settings = settings
        self.layout = layout
        self.method = Method(settings.method)
        self.device = resolve_device(settings.merge_device)
        self.precision = DTYPES[settings.precision]
        self.model = load_model(settings.base_model, DTYPES[settings.model_dtype], self.device)
        self.tokenizer = load_tokenizer(settings.base_model)
        self.shapes = target_module_shapes(self.model, settings.target_modules)
        self.fingerprint = fingerprint(self.model, self.shapes)
        self.limits = PayloadLimits(max_bytes=settings.max_update_bytes, max_rank=settings.max_rank)
        # fedit/zeropad export base + global LoRA without ever changing the base: keep it aside.
        live = module_weights(self.model, list(self.shapes))
        self.base_norm = weights_norm(live)  # of the base weights: the same limit after every restart
        self.base = {} if self.method is Method.FLORA else {n: w.detach().clone() for n, w in live.items()}
        self.global_lora: LoraAdapter | None = None
        self.validation = self._validation_data()
        log.info("model %s on %s: %d target modules, fingerprint %s",
                 settings.base_model, self.device, len(self.shapes), self.fingerprint[:12])

    def _validation_data(self) -> list[TokenizedExample] | None:
        settings = self.settings
        if not settings.validation_data:
            return None
        examples = load_examples(settings.validation_data, settings.validation_template)
        return tokenize_examples(
            examples, self.tokenizer, cutoff=settings.validation_cutoff, mask_prompt=settings.validation_mask_prompt
        )

    @property
    def max_update_norm(self) -> float:
        """The largest |s B A|_F an upload may have: as configured, else relative to the base weights."""
        if self.settings.max_update_norm is not None:
            return self.settings.max_update_norm
        return self.settings.max_update_norm_ratio * self.base_norm

    # --- version 0 and restart ---------------------------------------------------------------

    def initial(self) -> tuple[list[Artifact], float | None]:
        """Write version 0's artifacts (flora: base weights; others: the seeded global LoRA)."""
        if self.method is Method.FLORA:
            artifacts = [self._write_merged(0)]
        else:
            scaling = self.settings.required_scaling
            self.global_lora = seeded_lora(self.shapes, self.settings.lora_rank, scaling, self.settings.seed)
            artifacts = [self._write_global_lora(self.global_lora, 0)]
        return artifacts, self.evaluate()

    def restore(self, version: int, artifacts: dict[str, Artifact]) -> None:
        """Bring the in-memory state to committed ``version`` after a restart."""
        if self.method is Method.FLORA:
            self._load_merged(self.layout.absolute(artifacts["merged"].path))
        else:
            path = self.layout.absolute(artifacts["global"].path)
            self.global_lora, _ = read_adapter(
                path, self.shapes, rank=self.settings.lora_rank, scaling=self.settings.required_scaling
            )
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
        adapters, weights, decisions = robust_inputs(loaded, claimed, self.settings.robust_policy)
        seconds = {"load": time.perf_counter() - clock}
        clock = time.perf_counter()
        combined = aggregate(self.method, adapters, weights, self.precision)
        if self.method is Method.ZEROPAD:
            combined = pad_rank(combined, self.settings.lora_rank)
        combined = combined.to(torch.float32)  # what is served is what everyone merges
        error = aggregation_error(combined, adapters, weights)
        seconds["aggregate"] = time.perf_counter() - clock
        previous = self.global_lora
        try:
            artifacts = self._apply(number, combined, seconds)
            checkpoint = _timed(seconds, "checkpoint", self._checkpoint, number) if self._checkpoint_due(number) else None
            loss = _timed(seconds, "evaluate", self.evaluate)
        except BaseException:
            self.restore_previous(number - 1, previous)
            for path in (self.layout.global_artifact(number), self.layout.merged(number)):
                path.unlink(missing_ok=True)  # never recorded: no orphan of a failed round stays
            shutil.rmtree(self.layout.checkpoint(number), ignore_errors=True)
            raise
        return RoundOutput(artifacts, [d.weight for d in decisions], error, combined.rank, loss, checkpoint, seconds,
                           decisions)

    def faulty(self, submissions: Sequence[Submission]) -> dict[str, str]:
        """The updates that fail on their own (unreadable, or non-finite merged alone), with why.

        What a failed aggregation is blamed on: each update is re-read and merged into a copy of
        the current weights by itself; the model is not changed.
        """
        live = module_weights(self.model, list(self.shapes))
        reasons = {}
        for submission in submissions:
            try:
                merged_weights(live, self._load_update(submission), self.precision)
            except (ValueError, FileNotFoundError) as error:  # PayloadError is a ValueError
                reasons[submission.client_id] = f"{type(error).__name__}: {error}"
        return reasons

    def _apply(self, number: int, combined: LoraAdapter, seconds: dict[str, float]) -> list[Artifact]:
        """Write the new global artifact and move the model state to version ``number``."""
        clock = time.perf_counter()
        if self.method is Method.FLORA:
            artifacts = [self._write_global_adapter(combined, number)]
            live = module_weights(self.model, list(self.shapes))
            updated = merged_weights(live, combined, self.precision)  # all modules or none
            with torch.no_grad():
                for name, weight in live.items():
                    weight.copy_(updated[name])
            artifacts.append(self._write_merged(number))
        else:
            artifacts = [self._write_global_lora(combined, number)]
            self.global_lora = combined
        seconds["merge"] = time.perf_counter() - clock
        return artifacts

    def restore_previous(self, version: int, previous_lora: LoraAdapter | None) -> None:
        """Undo a failed round: reload the merged weights of ``version`` (flora) or the old LoRA."""
        if self.method is Method.FLORA:
            self._load_merged(self.layout.merged(version))
        else:
            self.global_lora = previous_lora

    def _load_merged(self, path: Path) -> None:
        """Set the model's target modules to merged weights written by ``_write_merged``."""
        weights, _ = read_weights(path, self.shapes)
        with torch.no_grad():
            for name, live in module_weights(self.model, list(self.shapes)).items():
                live.copy_(weights[name])

    def _load_update(self, submission: Submission) -> LoraAdapter:
        """An accepted update, revalidated from disk, with the scaling its header declared."""
        scaling = lora_scaling(submission.rank, submission.alpha, is_rslora(submission.scaling_rule))
        adapter, _ = read_adapter(
            self.layout.absolute(submission.path), self.shapes, rank=submission.rank, scaling=scaling, limits=self.limits
        )
        return adapter

    # --- files ----------------------------------------------------------------------------------

    def _artifact(self, kind: str, version: int, path: Path, size_sha: tuple[int, str]) -> Artifact:
        size, sha = size_sha
        return Artifact(kind, version, self.layout.relative(path), sha, size)

    def _write_global_adapter(self, adapter: LoraAdapter, version: int) -> Artifact:
        # Scaling 1 (every client's scaling is folded into A): alpha = rank under the standard rule.
        meta = PayloadMeta("global_adapter", rank=adapter.rank, alpha=float(adapter.rank), scaling_rule="standard",
                           round=version, version=version)
        path = self.layout.global_artifact(version)
        return self._artifact("global", version, path, write_adapter(path, adapter, meta, torch.float32))

    def _write_global_lora(self, adapter: LoraAdapter, version: int) -> Artifact:
        rule = "rslora" if self.settings.rslora else "standard"
        meta = PayloadMeta("global_lora", rank=adapter.rank, alpha=self.settings.lora_alpha, scaling_rule=rule,
                           round=version, version=version)
        path = self.layout.global_artifact(version)
        return self._artifact("global", version, path, write_adapter(path, adapter, meta, torch.float32))

    def _write_merged(self, version: int) -> Artifact:
        path = self.layout.merged(version)
        weights = module_weights(self.model, list(self.shapes))
        written = write_weights(path, weights, PayloadMeta("merged_modules", version=version))
        return self._artifact("merged", version, path, written)

    # --- exports and evaluation -------------------------------------------------------------------

    def _checkpoint_due(self, number: int) -> bool:
        every = self.settings.checkpoint_every
        return number >= self.settings.rounds or (every > 0 and number % every == 0)

    def _exported(self) -> contextlib.AbstractContextManager:
        """The model as users get it: flora as is; fedit/zeropad with the global LoRA merged in."""
        if self.method is Method.FLORA:
            return contextlib.nullcontext()
        return merged_temporarily(self.model, self.global_lora, self.precision)

    def _checkpoint(self, version: int) -> str:
        dest = self.layout.checkpoint(version)
        with self._exported():
            save_checkpoint(self.model, self.tokenizer, dest, self.layout.tmp, self._peft_adapter(version))
        log.info("round %d: saved the merged checkpoint %s", version, dest)
        return self.layout.relative(dest)

    def _peft_adapter(self, version: int) -> dict:
        """The cumulative update as a PEFT adapter: exact for every method (see export.concatenate)."""
        common = {"target_modules": self.settings.target_modules, "base_model": self.settings.base_model}
        if self.method is not Method.FLORA:
            return {"adapter": self.global_lora, "alpha": self.settings.lora_alpha, "rslora": self.settings.rslora, **common}
        adapters = [read_adapter(path, self.shapes, limits=artifact_limits(path.stat().st_size, self.shapes))[0]
                    for path in (self.layout.global_artifact(v) for v in range(1, version + 1))]
        total = concatenate(adapters)
        return {"adapter": total, "alpha": float(total.rank), "rslora": False, **common}

    def evaluate(self) -> float | None:
        """Loss of the exported model on the validation data, when the run has any."""
        if self.validation is None:
            return None
        with self._exported():
            return evaluate_loss(self.model, self.validation, batch_size=self.settings.validation_batch_size, device=self.device)
