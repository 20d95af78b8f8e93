"""Pre-train the built-in tiny Llama on the demo's general text and ship the weights.

    python -m flora.demo.pretrain                      # the shipped weights (common/builtin/)
    python -m flora.demo.pretrain --smoke --out DIR    # a few steps, to check the script runs

A real user fine-tunes a pre-trained model; the demo's base should be one too, or LoRA has
nothing to build on. The model starts from ``build_tiny_llama``'s seeded weights and reads
``flora.demo.corpus``'s generated prose (never the demo's tasks) packed into fixed blocks; the
loop is nanoGPT's shape: configuration, a pure learning-rate function, an evaluation, the loop.
The result and a record of how it was made (command, seed, steps, losses, fingerprint) land in
the package data that ``load_model("flora-tiny-llama")`` loads.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from flora.common.basemodel import build_tiny_llama, build_tokenizer
from flora.common.builtin_weights import FOLDER, save_builtin_weights
from flora.demo.corpus import paragraphs


class PretrainConfig(BaseModel):
    """How the shipped weights were trained; the defaults are the shipped run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(800, ge=1, description="optimiser steps")
    batch_size: int = Field(8, ge=1, description="blocks per step")
    block: int = Field(320, ge=16, le=1024, description="tokens per block (longer than the demo's prompts)")
    learning_rate: float = Field(5e-3, gt=0, le=1.0, description="peak learning rate of AdamW")
    warmup_steps: int = Field(50, ge=0, description="steps of linear warmup")
    seed: int = Field(0, ge=0, description="seed of the corpus and the data order")


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def blocks(tokenizer, seed: int, block: int):
    """Endless (block,) tensors of token ids: paragraphs, each ended by eos, packed back to back."""
    buffer: list[int] = []
    for text in paragraphs(seed):
        buffer += tokenizer(text).input_ids + [tokenizer.eos_token_id]
        while len(buffer) >= block:
            yield torch.tensor(buffer[:block])
            buffer = buffer[block:]


@torch.no_grad()
def evaluate(model, batch: torch.Tensor) -> float:
    """Mean next-token loss on a fixed batch the training stream never yields (another seed)."""
    model.eval()
    loss = model(input_ids=batch, labels=batch).loss.item()
    model.train()
    return loss


def pretrain(config: PretrainConfig, log_every: int = 100):
    """Train the seeded built-in model; returns (model, mean loss of the last steps, held-out loss)."""
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer)).train()
    stream = blocks(tokenizer, config.seed, config.block)
    held_out = torch.stack(list(itertools.islice(blocks(tokenizer, config.seed + 1, config.block), 32)))  # (32, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.1, betas=(0.9, 0.95))
    recent: list[float] = []
    start = time.monotonic()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        batch = torch.stack([next(stream) for _ in range(config.batch_size)])  # (B, T)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            print(f"step {step + 1}/{config.steps}: loss {sum(recent) / len(recent):.4f} "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
    return model.eval(), sum(recent) / len(recent), evaluate(model, held_out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flora.demo.pretrain", description=__doc__.splitlines()[0])
    for name, field in PretrainConfig.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default, help=field.description)
    parser.add_argument("--out", type=Path, default=FOLDER, help=f"where the weights and their record go (default: {FOLDER})")
    parser.add_argument("--smoke", action="store_true", help="3 steps of 2 short blocks: checks the script, trains nothing useful")
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in PretrainConfig.model_fields}
    if args.smoke:
        values.update(steps=3, batch_size=2, block=64, warmup_steps=1)
    config = PretrainConfig(**values)
    model, loss, held_out = pretrain(config)
    command = "python -m flora.demo.pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": command.strip(), **config.model_dump(), "train_loss": round(loss, 4),
              "held_out_loss": round(held_out, 4), "torch": torch.__version__}
    weights, notes = save_builtin_weights(model, record, args.out)
    print(f"train loss {loss:.4f}, held-out loss {held_out:.4f}: wrote {weights} and {notes}")


if __name__ == "__main__":
    main()
