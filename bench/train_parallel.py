"""Benchmark: data-parallel training (``flora-client --nproc``, ``--shard none`` and ``--shard full``)
against one process, same global batch.

Every side runs ``train_lora`` on the same packed token chunks (no padding), the same seed and the
same global micro-batch for the same steps. A group is N processes of a gloo (CPU) process group
with usable cores / N threads each, as the daemon's workers run: each holding the whole model
(``client.data_parallel.GroupReplicas``) or a shard of it (FSDP, ``client.sharding.ShardedReplicas``);
the single process gets every usable core. Timed: the training call of each process after one
untimed call on a fresh model (a group's time is its slowest rank's), not process start or model
loading. Repeats rotate which side runs first; the table reports median tokens/s, the ratio, and
how far each group's LoRA is from the single process's (relative Frobenius norm of B and of A).

    python -m bench.train_parallel                 # built-in tiny model, 2 processes on the CPU
    python -m bench.train_parallel --base-model ../shared/models/stories260K --nproc 2
    python -m bench.train_parallel --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from bench.report import RESULTS, write_results
from bench.train import packed_chunks, synthetic_examples
from flora.client.data_parallel import GroupReplicas
from flora.client.sharding import ShardedReplicas
from flora.client.trainer import TrainConfig, TrainResult, train_lora
from flora.common.basemodel import BUILTIN_MODEL, load_model, load_tokenizer
from flora.common.data import TokenizedExample
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.tables import format_table
from flora.common.threads import set_threads, threads_per_process, usable_cores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=BUILTIN_MODEL, help="Hub id, local directory or the built-in name")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel group (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="global micro-batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, interleaved")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads of every process (default: the client's rule)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--name", default="train_parallel", help="results file name, without .json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.seq_len, args.steps, args.repeats = 4, 32, 2, 1
    return args


def config_of(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(rank=args.rank, max_steps=args.steps, batch_size=args.batch_size, device="cpu", learning_rate=1e-3)


def _member(
    rank: int, world: int, args: argparse.Namespace, chunks: list[TokenizedExample], folder: str, sharded: bool
) -> None:
    """One process of the group: train, then rank 0 saves its LoRA and everyone their seconds."""
    set_threads(world, args.threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    replicas = (ShardedReplicas if sharded else GroupReplicas)(rank, world)
    try:
        # A fresh model for each call: a sharded group takes its model over for the round.
        train_lora(load_model(args.base_model), chunks, config_of(args), replicas=replicas)  # warm-up, as the single side's
        result = train_lora(load_model(args.base_model), chunks, config_of(args), replicas=replicas)
        Path(f"{folder}/rank{rank}.json").write_text(json.dumps({"seconds": result.seconds, "tokens": result.tokens}))
        if rank == 0:
            save_file({f"{n}.{i}": t.contiguous() for n, p in result.adapter.pairs.items() for i, t in enumerate(p)},
                      f"{folder}/lora.safetensors")
    finally:
        dist.destroy_process_group()


def run_group(args: argparse.Namespace, chunks: list[TokenizedExample], sharded: bool) -> tuple[float, int, LoraAdapter]:
    """(slowest rank's seconds, tokens, rank 0's adapter) of one group run."""
    with tempfile.TemporaryDirectory(prefix="flora-bench-dp-") as folder:
        mp.spawn(_member, args=(args.nproc, args, chunks, folder, sharded), nprocs=args.nproc)
        runs = [json.loads(Path(f"{folder}/rank{r}.json").read_text()) for r in range(args.nproc)]
        tensors = load_file(f"{folder}/lora.safetensors")
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    adapter = LoraAdapter({n: LoraPair(tensors[f"{n}.0"], tensors[f"{n}.1"]) for n in names})
    return max(r["seconds"] for r in runs), runs[0]["tokens"], adapter


def run_single(args: argparse.Namespace, chunks: list[TokenizedExample]) -> TrainResult:
    set_threads(1, args.threads)
    return train_lora(load_model(args.base_model), chunks, config_of(args))


def distance(got: LoraAdapter, want: LoraAdapter, factor: int) -> float:
    """Largest relative Frobenius distance of one factor (0: A, 1: B) over the modules."""
    return max(float(torch.linalg.norm(got.pairs[n][factor] - p[factor]) / torch.linalg.norm(p[factor]))
               for n, p in want.pairs.items())


def main() -> None:
    args = parse_args()
    chunks = packed_chunks(synthetic_examples(max(64, args.batch_size * args.steps)), load_tokenizer(args.base_model),
                           args.seq_len, args.batch_size * args.steps)
    run_single(args, chunks)  # warm-up (each group process runs one untimed call too)
    groups = {f"{args.nproc} processes": False, f"{args.nproc} processes, FSDP": True}  # side -> sharded
    sides = ["1 process", *groups]
    rates: dict[str, list[float]] = {side: [] for side in sides}
    distances: dict[str, list[tuple[float, float]]] = {side: [] for side in groups}
    for repeat in range(args.repeats):
        adapters = {}
        for side in sides[repeat % len(sides):] + sides[: repeat % len(sides)]:
            if side == "1 process":
                single = run_single(args, chunks)
                rates[side].append(single.tokens / single.seconds)
            else:
                seconds, tokens, adapters[side] = run_group(args, chunks, groups[side])
                rates[side].append(tokens / seconds)
        for side, adapter in adapters.items():
            distances[side].append((distance(adapter, single.adapter, 1), distance(adapter, single.adapter, 0)))
    medians = {side: statistics.median(values) for side, values in rates.items()}
    worst = {side: (max(d[0] for d in ds), max(d[1] for d in ds)) for side, ds in distances.items()}
    base = medians["1 process"]
    rows = [{"training": side, "threads each": threads_per_process(1 if side == "1 process" else args.nproc, args.threads),
             "median tok/s": round(m), "ratio": f"{m / base:.2f}",
             "|dB|/|B|": f"{worst[side][0]:.1e}" if side in worst else "-",
             "|dA|/|A|": f"{worst[side][1]:.1e}" if side in worst else "-"} for side, m in medians.items()]
    print(format_table(rows, ["training", "threads each", "median tok/s", "ratio", "|dB|/|B|", "|dA|/|A|"]))
    print("|dB|/|B|, |dA|/|A|: the group's LoRA against the single process's (same global batch), worst repeat")
    path = write_results(args.name, {"base_model": args.base_model, "nproc": args.nproc, "batch_size": args.batch_size,
                                     "seq_len": args.seq_len, "steps": args.steps, "repeats": args.repeats,
                                     "usable_cores": usable_cores(), "tokens_per_second": rates,
                                     "median_tokens_per_second": medians,
                                     "relative_distance_b": {side: w[0] for side, w in worst.items()},
                                     "relative_distance_a": {side: w[1] for side, w in worst.items()}}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
