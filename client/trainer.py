"""Local training of one round: a fresh (or server-initialised) LoRA on the client's data.

``train_lora`` borrows the caller's model: it attaches PEFT LoRA layers, trains them, reads the
factors out as a :class:`LoraAdapter` and removes the layers again, leaving the model exactly as
it was. Keeping the model free of adapters between rounds is what lets a client merge each
global adapter into its own weights and start the next round from a fresh LoRA.

The loop reads like nanoGPT's: configuration, a pure learning-rate function, setup, the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig, LoraModel
from peft.tuners.lora import LoraLayer
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from flora.client.layer_placement import placed_across_devices
from flora.client.replicas import ALONE, Replicas
from flora.common.architectures import fan_in_fan_out
from flora.common.basemodel import target_module_shapes
from flora.common.devices import resolve_device
from flora.common.data import IGNORE_INDEX, TokenizedExample, collate
from flora.common.evaluate import autocast_context, evaluate_loss, shifted_targets, summed_token_loss
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling

log = logging.getLogger(__name__)

ADAPTER = "default"
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class TrainConfig(BaseModel):
    """Hyper-parameters of one client's local training; the descriptions double as CLI help."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, le=4096, description="LoRA rank r of this client")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2 * rank")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r) instead of alpha / r")
    target_modules: tuple[str, ...] | None = Field(
        None, min_length=1, description="suffixes of the linear layers to adapt, or all-linear; default: the model family's"
    )
    max_steps: int = Field(0, ge=0, description="optimiser steps per round; 0 = run `epochs` epochs")
    epochs: int = Field(1, ge=1, description="passes over the local data when max_steps is 0")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    learning_rate: float = Field(3e-4, gt=0, le=1.0, description="peak learning rate of AdamW")
    schedule: Literal["cosine", "constant", "run"] = Field(
        "cosine", description="learning-rate decay after warmup: cosine or constant each round, or run: one cosine over the whole run"
    )
    warmup_steps: int = Field(0, ge=0, description="steps of linear learning-rate warmup")
    round: int = Field(1, ge=1, description="the run's round being trained (the schedule 'run' needs it)")
    rounds: int = Field(1, ge=1, description="rounds of the run (the schedule 'run' needs it)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA factors")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 disables clipping")
    seed: int = Field(0, ge=0, description="seed of the LoRA initialisation and the data order")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="training device: auto, cpu, cuda or cuda:N"
    )
    dtype: Literal["bf16", "fp16", "none"] = Field("bf16", description="autocast precision on CUDA (ignored on CPU)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory for about a third more compute"
    )

    @property
    def lora_alpha(self) -> float:
        """The alpha in effect: the configured one, else 2 * rank."""
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    @property
    def scaling(self) -> float:
        """The scaling s of this client's update s * B @ A."""
        return lora_scaling(self.rank, self.lora_alpha, self.rslora)


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced, for the upload and the round history."""

    adapter: LoraAdapter
    train_loss: float  # mean over the optimiser steps of each step's token-weighted loss
    validation_loss: float | None
    steps: int
    tokens: int  # non-padding tokens run through the model
    seconds: float  # wall time of the training loop
    num_examples: int  # distinct training examples


class TrainingCancelled(Exception):
    """Raised when ``should_stop`` asked training to stop; the caller's model is already restored."""


def lr_at(step: int, num_steps: int, config: TrainConfig) -> float:
    """Learning rate at 0-based ``step`` of a round of ``num_steps``: linear warmup, then constant or
    cosine decay towards 0.

    Schedule ``run`` is one warmup and one cosine over the whole run: round r of R is the r-th of R
    equal slices of it, so clients whose rounds have different step counts stay on the same curve,
    and a round past the planned count (a run extended) keeps the final rate.
    """
    if config.schedule == "run":
        step, num_steps = (config.round - 1) * num_steps + step, config.rounds * num_steps
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return config.learning_rate
    progress = min(1.0, (step - config.warmup_steps) / max(1, num_steps - config.warmup_steps))
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(num_examples: int, config: TrainConfig) -> int:
    """Optimiser steps of the round: max_steps, else enough to see every example ``epochs`` times."""
    if config.max_steps:
        return config.max_steps
    micro_batches = config.epochs * math.ceil(num_examples / config.batch_size)
    return math.ceil(micro_batches / config.grad_accum)


def _micro_batches(
    data: Sequence[TokenizedExample], batch_size: int, generator: torch.Generator
) -> Iterator[list[TokenizedExample]]:
    """Endless micro-batches: each epoch a fresh seeded permutation, the last batch may be short."""
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [data[i] for i in order[start : start + batch_size]]


# --- attaching and removing the LoRA layers -------------------------------------------------


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _fresh_init(layers: dict[str, LoraLayer], generator: torch.Generator) -> None:
    """PEFT's default init (A Kaiming-uniform, B zero), drawn from our seeded generator.

    PEFT draws A from the global RNG; redrawing it here makes the factors depend on the seed
    alone, not on whatever else consumed random numbers before.
    """
    for name in sorted(layers):
        weight = layers[name].lora_A[ADAPTER].weight
        cpu = torch.empty(weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
        weight.copy_(cpu)
        layers[name].lora_B[ADAPTER].weight.zero_()


def _load_init(layers: dict[str, LoraLayer], init: LoraAdapter, rank: int, scaling: float) -> None:
    """Start from a given adapter: its leading ``rank`` rows of A and columns of B.

    A is rescaled by init.scaling / scaling so that, at full rank, this client's s * B @ A equals
    the given adapter's update exactly whatever either side's alpha and scaling rule.
    """
    if set(init.pairs) != set(layers):
        raise ValueError(
            f"initial adapter modules {init.module_names} do not match the model's target modules {sorted(layers)}"
        )
    if init.rank < rank:
        raise ValueError(f"initial adapter has rank {init.rank}, smaller than this client's rank {rank}")
    factor = init.scaling / scaling
    for name, layer in layers.items():
        a, b = init.pairs[name]
        lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if a.shape[1] != lora_a.shape[1] or b.shape[0] != lora_b.shape[0]:
            raise ValueError(f"{name}: initial factors {tuple(b.shape)} x {tuple(a.shape)} do not fit the layer")
        lora_a.copy_(a[:rank].to(torch.float32) * factor)
        lora_b.copy_(b[:, :rank])


def _extract(layers: dict[str, LoraLayer], scaling: float, replicas: Replicas) -> LoraAdapter:
    pairs = {
        name: LoraPair(
            replicas.whole(layer.lora_A[ADAPTER].weight.detach()).to("cpu", torch.float32).clone(),
            replicas.whole(layer.lora_B[ADAPTER].weight.detach()).to("cpu", torch.float32).clone(),
        )
        for name, layer in sorted(layers.items())
    }
    return LoraAdapter(pairs, scaling)


@contextlib.contextmanager
def attached_lora(
    model: nn.Module, config: TrainConfig, device: torch.device, *, moves: bool = True
) -> Iterator[dict[str, LoraLayer]]:
    """Attach PEFT LoRA layers to ``model`` on ``device``; on exit restore the model exactly.

    Restored: the module tree (the original Linear objects), the parameters' requires_grad, the
    train/eval mode and the device. Yields the LoRA layers by base-model module name. With
    ``moves=False`` the model stays where it is (its layers placed across devices, or about to
    be sharded) and each LoRA layer sits beside its base layer.
    """
    expected = target_module_shapes(model, config.target_modules)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    home = next(model.parameters()).device
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        use_rslora=config.rslora,
        target_modules=sorted(expected),  # full names: exactly the layers resolved above
        fan_in_fan_out=fan_in_fan_out(model, expected),
        lora_dropout=0.0,
        bias="none",
    )
    if moves:
        model.to(device)
    try:
        with torch.random.fork_rng(devices=[]):  # PEFT's own init must not advance the caller's RNG
            tuner = LoraModel(model, peft_config, ADAPTER)
        try:
            layers = _lora_layers(model)
            if set(layers) != set(expected):
                raise RuntimeError(f"PEFT adapted {sorted(layers)}, expected {sorted(expected)}")
            yield layers
        finally:
            tuner.unload()
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])
        model.train(was_training)
        if moves:
            model.to(home)


# --- the loop -------------------------------------------------------------------------------


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Activation checkpointing for the block, then off again (the model is left as it was).

    Non-reentrant checkpointing: gradients reach the LoRA factors inside each layer although the
    frozen embeddings' output does not require grad (no ``enable_input_require_grads`` hook).
    """
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.activation_checkpointing_disable()


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    return _AMP_DTYPES[config.dtype] if device.type == "cuda" else None


def _micro_batch_budget(num_examples: int, steps: int, config: TrainConfig) -> int:
    """Micro-batches of the whole round: an epoch count ends mid-step rather than spill over."""
    if config.max_steps:
        return steps * config.grad_accum
    return config.epochs * math.ceil(num_examples / config.batch_size)


def _optimizer_step(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    replicas: Replicas,
) -> torch.Tensor:
    """Forward and backward over this process's rows of one step's micro-batches; returns their
    share of the step's token-weighted loss.

    Each micro-batch's summed loss is divided by the label count of the whole step (all rows, all
    replicas), so the accumulated gradient is that of one batch of all the step's tokens (not a
    mean of means) once the replicas' gradients are summed.
    """
    targets = [shifted_targets(batch["labels"]) for batch in batches]  # (B, T) each, on CPU
    num_labels = max(1, sum(int((t != IGNORE_INDEX).sum()) for t in targets))
    step_loss = torch.zeros((), device=device)
    for batch, target in zip(batches, targets):
        rows = replicas.rows(len(target))
        if rows.start >= rows.stop:
            if not replicas.shards:
                continue
            # A shard of the model joins every forward and backward of its group: one row whose
            # every label is ignored, which adds nothing to the loss or the gradients.
            rows, target = slice(0, 1), torch.full_like(target[:1], IGNORE_INDEX)
        with autocast_context(device, amp_dtype):
            # Right padding under a causal mask: no real token attends to the padding after it,
            # so no attention mask is passed and SDPA keeps its fast causal kernel.
            logits = model(input_ids=batch["input_ids"][rows].to(device, non_blocking=True), use_cache=False).logits
        loss = summed_token_loss(logits, target[rows].to(device, non_blocking=True)) / num_labels
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    return step_loss


def _train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    data: Sequence[TokenizedExample],
    config: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    on_step: Callable[[int, int, float], None] | None,
    should_stop: Callable[[], bool] | None,
    replicas: Replicas,
) -> tuple[float, int, int]:
    """Run the round's optimiser steps; returns (mean step loss, steps, non-padding tokens)."""
    steps = total_steps(len(data), config)
    budget = _micro_batch_budget(len(data), steps, config)
    batches = _micro_batches(data, config.batch_size, generator)
    amp_dtype = _amp_dtype(config, device)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    loss_sum = torch.zeros((), device=device)  # summed on the device: one host sync per round
    tokens = 0
    for step in range(steps):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training cancelled after {step} of {steps} steps")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, config)
        micro = [collate(next(batches)) for _ in range(min(config.grad_accum, budget - step * config.grad_accum))]
        tokens += sum(int(batch["attention_mask"].sum()) for batch in micro)
        step_loss = _optimizer_step(model, micro, device, amp_dtype, scaler, replicas)
        replicas.reduce(params, step_loss)
        if config.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += step_loss
        if on_step is not None:
            on_step(step + 1, steps, step_loss.item())
    return loss_sum.item() / steps, steps, tokens


def train_lora(
    model: nn.Module,
    train_data: Sequence[TokenizedExample],
    config: TrainConfig,
    *,
    val_data: Sequence[TokenizedExample] | None = None,
    init: LoraAdapter | None = None,
    train_a: bool = True,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    replicas: Replicas = ALONE,
) -> TrainResult:
    """Train a LoRA on ``model`` for one round and return its factors; the model is left unchanged.

    The LoRA is fresh (A random from ``config.seed``, B zero) or, for methods that warm-start, starts
    from ``init``; with ``train_a=False`` A stays as initialised and only B learns (FFA-LoRA).
    ``on_step(step, total_steps, loss)`` reports progress after each optimiser
    step; ``should_stop()`` is asked before each step and cancels with :class:`TrainingCancelled`.
    With ``replicas`` the process trains its rows of each micro-batch as one of a data-parallel group;
    a group that shards the model (FSDP) takes it over for the round (its workers discard it after).
    """
    if not train_data:
        raise ValueError("no training examples")
    device = resolve_device(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    moves = not (replicas.shards or placed_across_devices(model))
    with attached_lora(model, config, device, moves=moves) as layers:
        with torch.no_grad():
            if init is None:
                _fresh_init(layers, generator)
            else:
                _load_init(layers, init, config.rank, config.scaling)
        for layer in layers.values():
            layer.lora_A[ADAPTER].weight.requires_grad_(train_a)
        replicas.shard(model, device)  # after the init: sharding replaces the parameters
        params = []
        for layer in layers.values():
            params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight] if train_a else [layer.lora_B[ADAPTER].weight]
        model.train()
        start = time.perf_counter()
        with _checkpointing(model, config.gradient_checkpointing):
            train_loss, steps, tokens = _train_loop(model, params, train_data, config, device, generator, on_step,
                                                    should_stop, replicas)
        seconds = time.perf_counter() - start
        validation_loss = None
        if val_data:
            validation_loss = evaluate_loss(
                model, val_data, batch_size=config.batch_size, device=device, autocast_dtype=_amp_dtype(config, device)
            )
        adapter = _extract(layers, config.scaling, replicas)
    log.info(
        "trained rank-%d LoRA: %d steps, %d tokens in %.1fs (%.0f tokens/s), train loss %.4f, validation loss %s",
        config.rank, steps, tokens, seconds, tokens / max(seconds, 1e-9), train_loss,
        "-" if validation_loss is None else f"{validation_loss:.4f}",
    )
    return TrainResult(adapter, train_loss, validation_loss, steps, tokens, seconds, len(train_data))
