"""Benchmark: local training throughput (tokens/s) of ``train_lora`` against a plain PEFT loop.

DESIGN.md section 8 asks that client training be no slower than a plain PEFT + PyTorch loop on
the same model and batch. Both sides here train the same model on batches of the same shape
(token streams packed into ``--seq-len`` chunks, so there is no padding to differ), for the same
number of steps, timed end to end including attaching and removing the LoRA. The baseline gets
its batches collated and on the device before its clock starts; ``train_lora`` collates inside
its timed call and also runs its LR schedule and gradient clipping. Repeats are interleaved and
alternate which side runs first; the table reports medians and the ratio.

    python -m bench.train                      # built-in tiny model, synthetic data
    python -m bench.train --base-model ../shared/models/stories260K \\
        --data ../shared/data/dolly-10clients/local_training_0.json --name train-stories260K
    python -m bench.train --smoke              # a few seconds, for CI
    python -m bench.train --precisions float32,bf16,int8,nf4   # memory and tokens/s per base precision
                                               # instead (bench/precision.py: shapes tiny and small)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from bench.precision import add_arguments as add_precision_arguments
from bench.precision import run as run_precisions
from bench.report import RESULTS, write_results
from flora.client.trainer import TrainConfig, train_lora
from flora.common.devices import resolve_device
from flora.common.architectures import target_suffixes
from flora.common.basemodel import BUILTIN_MODEL, load_model, load_tokenizer
from flora.common.data import Example, TokenizedExample, collate, load_examples, tokenize_examples
from flora.common.tables import format_table

WORDS = "the a cat dog sat ran on under big small red blue house tree river stone quickly slowly".split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=BUILTIN_MODEL, help="Hub id, local directory or the built-in name")
    parser.add_argument("--data", help="JSON/JSONL instruction data (default: synthetic examples)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each side, interleaved")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--name", default="train", help="results file name, without .json (default: train)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, in seconds")
    parser.add_argument("--precisions", default="", help="comma-separated of float32, bf16, int8, nf4: "
                        "the client's memory and tokens/s with each base precision instead (bench/precision.py)")
    add_precision_arguments(parser)
    args = parser.parse_args()
    if args.precisions and args.name == "train":
        args.name = "precision"  # its own results file, not the throughput comparison's
    if args.smoke:
        args.batch_size, args.seq_len, args.steps, args.repeats = 2, 32, 3, 1
    return args


def synthetic_examples(count: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [
        Example(f"Write a sentence about {rng.choice(WORDS)}.\n", " ".join(rng.choices(WORDS, k=60)) + ".")
        for _ in range(count)
    ]


def packed_chunks(examples: list[Example], tokenizer, seq_len: int, needed: int) -> list[TokenizedExample]:
    """The examples' token stream cut into ``seq_len`` chunks: every batch is full, no padding."""
    stream = [t for ex in tokenize_examples(examples, tokenizer, cutoff=4 * seq_len) for t in ex.input_ids]
    chunks = [TokenizedExample(tuple(stream[i : i + seq_len])) for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if len(chunks) < needed:
        raise SystemExit(f"the data gives {len(chunks)} chunks of {seq_len} tokens, fewer than the {needed} needed")
    return chunks


def run_ours(model: nn.Module, chunks: list[TokenizedExample], args: argparse.Namespace) -> tuple[int, float]:
    config = TrainConfig(
        rank=args.rank, max_steps=args.steps, batch_size=args.batch_size, device=args.device, learning_rate=1e-4
    )
    start = time.perf_counter()
    result = train_lora(model, chunks, config)
    return result.tokens, time.perf_counter() - start


def run_baseline(model: nn.Module, chunks: list[TokenizedExample], args: argparse.Namespace) -> tuple[int, float]:
    """The plain loop a PEFT user writes: get_peft_model, AdamW, forward with labels, backward, step."""
    device = resolve_device(args.device)
    model.to(device)
    batches = [
        {k: v.to(device) for k, v in collate(chunks[i * args.batch_size : (i + 1) * args.batch_size]).items()}
        for i in range(args.steps)
    ]
    start = time.perf_counter()
    peft_model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(target_suffixes(model, None)),
                          lora_dropout=0.0)  # the family's default targets, as train_lora's
    )
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    peft_model.train()
    tokens = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch in batches:
        with autocast:
            loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    peft_model.unload()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.eval()
    return tokens, time.perf_counter() - start


def measure(model: nn.Module, chunks: list[TokenizedExample], args: argparse.Namespace) -> dict[str, list[float]]:
    """tokens/s of each side per repeat, after one untimed warm-up run of each."""
    sides: dict[str, Callable[..., tuple[int, float]]] = {"train_lora": run_ours, "plain_peft": run_baseline}
    for run in sides.values():
        run(model, chunks, args)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            tokens, seconds = sides[name](model, chunks, args)
            rates[name].append(tokens / seconds)
    return rates


def report(rates: dict[str, list[float]], args: argparse.Namespace, model: nn.Module) -> dict:
    """Print the medians and the ratio; return what goes into the JSON results."""
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["train_lora"] / medians["plain_peft"]
    rows = [{"loop": name, "median tok/s": round(medians[name]), "min": round(min(v)), "max": round(max(v))} for name, v in rates.items()]
    print(format_table(rows, ["loop", "median tok/s", "min", "max"]))
    print(f"ratio train_lora / plain_peft = {ratio:.3f}")
    return {
        "base_model": args.base_model,
        "data": args.data or "synthetic",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "repeats": args.repeats,
        "rank": args.rank,
        "device": str(resolve_device(args.device)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_second": rates,
        "median_tokens_per_second": medians,
        "ratio": ratio,
    }


def main() -> None:
    # get_peft_model calls a transformers method deprecated in 5.x; the notice is noise here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = parse_args()
    if args.precisions:
        print(f"wrote {run_precisions(args, args.precisions.split(','))}")
        return
    tokenizer = load_tokenizer(args.base_model)
    model = load_model(args.base_model)
    needed = args.batch_size * args.steps
    examples = load_examples(args.data) if args.data else synthetic_examples(max(64, needed))
    chunks = packed_chunks(examples, tokenizer, args.seq_len, needed)
    rates = measure(model, chunks, args)
    path = write_results(args.name, report(rates, args, model), args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
