"""Secure aggregation's maths per round: bytes each client moves and seconds of the plan, against plain flora.

For K = 3, 10, 50, 100 clients (ranks cycled, e.g. 16/8/4/2) and two shapes (one Llama-7B layer's
q_proj and v_proj, 4096 x 4096 each; the 1B shape's 32 target modules), per round and client:

- bytes up: the uint64 vectors of the masked passes (pass 1: D_k Omega or the dense D_k; pass 2:
  D_k^T Q), against plain flora's upload of the float32 factors A_k and B_k (same run, same ranks);
- extra bytes down: the broadcast Q (float64) between the passes; the round's global update after
  it is the same downlink as plain flora's and is not counted;
- seconds of the plan in process: a client's clipping, projections and encoding (median over a
  few sampled clients, one per rank; drawing Omega, once per round, apart), and the server's
  steps (decode, range check, QR, assembly) plus the downlink's factorization of their result,
  against plain flora's merge of all K clients' factors (the stack) plus the downlink's of it.

Measured with a plain sum mod 2^64: no masking, key agreement or secret sharing (the crypto
layer's cost, benchmarked on its own), so the seconds are the maths alone. Usage:

    python -m bench.secagg_plan                          # K = 3,10,50,100; 4096 and 1b (several minutes)
    python -m bench.secagg_plan --clients 10 --shapes 4096
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import RESULTS, write_results
from bench.scale import SHAPES as MODEL_SHAPES
from flora.common.downlink import plan_downlink
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import get_method
from flora.common.secagg.contribution import client_change, client_contribution
from flora.common.secagg.finish import Sketch, server_step
from flora.common.secagg.fixedpoint import wrapping_sum
from flora.common.secagg.plan import RoundPlan, plan_round, sketch_bases, vector_length
from flora.common.tables import format_table

CLIP = 1.0


def module_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """``1b``: the 1B shape's q_proj and v_proj (32 modules); a number d: one layer's q_proj and
    v_proj of d x d (4096: Llama-7B's)."""
    if shape != "1b":
        return {f"layers.0.self_attn.{m}": (int(shape), int(shape)) for m in ("q_proj", "v_proj")}
    s = MODEL_SHAPES["1b"]
    kv = s.kv_heads * (s.hidden // s.heads)
    return {f"layers.{i}.self_attn.{m}": (d_out, s.hidden)
            for i in range(s.layers) for m, d_out in (("q_proj", s.hidden), ("v_proj", kv))}


def trained(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> LoraAdapter:
    """A random LoRA of ``rank`` (alpha = 2 rank), float32 as a client uploads it."""
    generator = torch.Generator().manual_seed(seed)
    return LoraAdapter({n: LoraPair(torch.randn(rank, d_in, generator=generator) / d_in**0.5,
                                    0.01 * torch.randn(d_out, rank, generator=generator))
                        for n, (d_out, d_in) in shapes.items()}, 2.0)


def byte_counts(plan: RoundPlan, shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Per client and round: secure uplink, extra downlink (Q), plain flora's mean uplink, in MB."""
    up = 8 * sum(vector_length(plan, stage) for stage in range(1, plan.passes + 1))
    down = 8 * sum(m.d_out * m.columns for m in plan.modules if not m.dense)
    plain = statistics.mean(4 * r * sum(d_out + d_in for d_out, d_in in shapes.values()) for r in plan.ranks)
    return {"secure_up_MB": up / 1e6, "q_down_MB": down / 1e6, "plain_up_MB": plain / 1e6, "up_ratio": up / plain}


def timed_round(plan: RoundPlan, shapes: dict[str, tuple[int, int]], samples: int) -> dict[str, float]:
    """Seconds of Omega, of one client's passes (median of ``samples`` clients), of the server's
    steps, and of the downlink's factorization of the result (as the server does next)."""
    clock = time.perf_counter()
    bases = sketch_bases(plan)
    omega_s = time.perf_counter() - clock
    changes, client_s, total = [], [], None
    for k in range(min(samples, plan.clients)):
        clock = time.perf_counter()
        change = client_change(plan, k, trained(shapes, plan.ranks[k], k))
        vector = np.concatenate(client_contribution(plan, 1, change, bases))
        client_s.append(time.perf_counter() - clock)
        changes.append(change)
        total = vector if total is None else wrapping_sum([total, vector])  # one vector held at a time
    clock = time.perf_counter()  # the sampled clients' sum: the server's work does not depend on how many
    step = server_step(plan, 1, total)
    server_s = time.perf_counter() - clock
    if isinstance(step, Sketch):
        total = None
        for k, change in enumerate(changes):
            clock = time.perf_counter()
            vector = np.concatenate(client_contribution(plan, 2, change, step.sent))
            client_s[k] += time.perf_counter() - clock
            total = vector if total is None else wrapping_sum([total, vector])
        clock = time.perf_counter()
        step = server_step(plan, 2, total, step)
        server_s += time.perf_counter() - clock
    clock = time.perf_counter()
    plan_downlink(step.delta.pairs)
    return {"omega_s": omega_s, "client_s": statistics.median(client_s), "server_s": server_s,
            "downlink_s": time.perf_counter() - clock}


def timed_plain(shapes: dict[str, tuple[int, int]], ranks: list[int]) -> dict[str, float]:
    """The baseline: plain flora's merge (the stack) of all K clients and the downlink's factorization of it."""
    updates = [trained(shapes, r, k) for k, r in enumerate(ranks)]
    clock = time.perf_counter()
    result = get_method("flora").merge(None, updates, [1.0 / len(ranks)] * len(ranks))
    merge_s = time.perf_counter() - clock
    clock = time.perf_counter()
    plan_downlink(result.delta.pairs)
    return {"plain_merge_s": merge_s, "plain_downlink_s": time.perf_counter() - clock}


def measure(shape: str, clients: int, ranks: list[int], samples: int, log) -> dict[str, object]:
    """One row: the plan's sizes and seconds for ``clients`` clients of cycled ``ranks``."""
    shapes = module_shapes(shape)
    client_ranks = list(itertools.islice(itertools.cycle(ranks), clients))
    plan = plan_round(get_method("flora"), None, shapes, client_ranks, [2.0] * clients, [1.0 / clients] * clients,
                      CLIP, seed=clients)
    dense = sum(m.dense for m in plan.modules)
    row = {"shape": shape, "K": clients, "sum_of_ranks": sum(client_ranks), "modules": len(plan.modules),
           "dense": dense, "passes": plan.passes, "scale_bits": plan.bits, **byte_counts(plan, shapes)}
    log(f"{shape} K={clients}: {row['secure_up_MB']:.1f} MB up per client, timing {min(samples, clients)} clients")
    row.update(timed_round(plan, shapes, samples))
    row.update(timed_plain(shapes, client_ranks))
    row["server_vs_plain"] = (row["server_s"] + row["downlink_s"]) / (row["plain_merge_s"] + row["plain_downlink_s"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="3,10,50,100", help="comma-separated K values")
    parser.add_argument("--shapes", default="4096,1b", help="comma-separated: 1b, or d for one layer's d x d q/v")
    parser.add_argument("--ranks", default="16,8,4,2", help="client ranks, cycled over the K clients")
    parser.add_argument("--samples", type=int, default=4, help="clients timed per row (median)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.smoke:  # 256: K = 3 is sketched, K = 10 dense
        args.clients, args.shapes, args.samples = "3,10", "256", 2
    ranks = [int(r) for r in args.ranks.split(",")]
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    rows = [measure(shape, int(k), ranks, args.samples, log)
            for shape in args.shapes.split(",") for k in args.clients.split(",")]
    print(f"\nflora under secure aggregation, per round and client (ranks {args.ranks} cycled; plain sum mod 2^64, "
          "no masking cost)")
    print(format_table(rows, ["shape", "K", "sum_of_ranks", "modules", "dense", "passes", "secure_up_MB", "plain_up_MB",
                              "up_ratio", "q_down_MB"]))
    print("\nSeconds: a client's clipping, projections and encoding (Omega apart); the server's steps and the "
          "downlink's factorization of their result, against plain flora's merge (the stack) and its downlink")
    print(format_table(rows, ["shape", "K", "omega_s", "client_s", "server_s", "downlink_s", "plain_merge_s",
                              "plain_downlink_s", "server_vs_plain"]))
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    payload = {"ranks": ranks, "samples": args.samples, "rows": rows,
               "wall_seconds": time.perf_counter() - start, "load_average_1_5_15_min_at_end": os.getloadavg()}
    print(f"\nwrote {write_results('secagg_plan', payload, args.out)}")


if __name__ == "__main__":
    main()
