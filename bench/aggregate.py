"""Cost of aggregation and the downlink: stacking, factorizing and merging K client updates for Llama-7B-shaped modules.

For each K, clients get ranks cycling through 4, 8, 16, 32, 64 (heterogeneous, as in the paper).
One transformer layer's q_proj and v_proj (4096 x 4096 in Llama-7B) are measured; a 32-layer
model costs 32 times the per-layer numbers (the layers are independent and identical in shape).

Timings (``--timed-clients``, K = 10, 30, 100 by default): stacking, planning the exact downlink
(``factorize_s``: QR + SVD of the core, or the dense product when that is the smaller form) and
merging, with two baselines measured in the same run: one pass reading the same update bytes (a
reduction over every tensor) and filling freshly allocated memory of the stacked adapter's size.
Stacking reads the updates once and writes them once into new memory, so its GB/s should sit near
the slower of the two. Merging is a (d_out x R) @ (R x d_in) product, linear in R = sum of ranks.
The factorization's own baseline is Householder QR of every module (``householder_s``: the path
before CholeskyQR, and still the path for ill-conditioned stacks); ``warm_*`` time the exact
downlink of a flora-warm round's change, whose stack cancels (Householder), built with one
removed term per distinct start as ``exact_change`` does (``grouped``) and with every client's
copy (``per_client``, as before).

Downlink bytes (every K of ``--clients``, 10 .. 1000): the stacked adapter (what servers sent
before), canonical factors, the dense delta, the exact downlink the server sends (per module the
smaller of the two) and the compressed one at retained energy 0.99 and 0.95
(``flora.common.downlink``). Stacked, canonical, dense and exact sizes follow from R and d (the
sum of Gaussian factors has rank min(R, d)); at the timed K the exact size is also read from the
planned downlink itself and must agree. The compressed sizes need each module's spectrum: the
canonical factors' singular values while R < d, else the singular values of the dense delta
(values only, which is what keeps K = 1000 feasible).

    python -m bench.aggregate            # bytes for K = 10 .. 1000, timings for K = 10, 30, 100 (~4 GB RAM)
    python -m bench.aggregate --smoke    # seconds, tiny shapes
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from bench.report import RESULTS, median_seconds, write_results
from flora.common.aggregation import flora_stack
from flora.common.canonical import canonical_pair, householder_svd, singular_values
from flora.common.downlink import DownlinkPolicy, kept_rank, plan_downlink
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling
from flora.common.merge import merged_weights
from flora.common.methods.base import exact_change
from flora.common.tables import format_table
from flora.common.update import update_numel
from flora.common.weights import client_weights

RANKS = (4, 8, 16, 32, 64)
LAYERS_IN_7B = 32
ENERGIES = (0.99, 0.95)
ELEMENT = 4  # bytes of a float32 value
MODULES = ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]


def synthetic_updates(count: int, dim: int, modules: list[str], seed: int = 0) -> list[LoraAdapter]:
    """K client updates with ranks cycling through RANKS and alpha = 2 r."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for rank in itertools.islice(itertools.cycle(RANKS), count):
        pairs = {m: LoraPair(torch.randn(rank, dim, generator=gen), torch.randn(dim, rank, generator=gen)) for m in modules}
        updates.append(LoraAdapter(pairs, lora_scaling(rank, 2.0 * rank)))
    return updates


def total_rank(count: int) -> int:
    """R = sum of the K clients' ranks (they cycle through RANKS)."""
    return sum(itertools.islice(itertools.cycle(RANKS), count))


def write_fresh(nbytes: int) -> torch.Tensor:
    """Second baseline: fill newly allocated memory of the stacked adapter's size (what stacking writes)."""
    return torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)


def read_once(updates: list[LoraAdapter]) -> float:
    """Baseline: touch every byte of every factor once."""
    total = 0.0
    for update in updates:
        for a, b in update.pairs.values():
            total += float(a.sum()) + float(b.sum())
    return total


def analytic_sizes(rank: int, dim: int, modules: int) -> dict:
    """MB per round of the exact forms for a stack of sum of ranks ``rank`` (d_out = d_in = dim)."""
    canonical = min(rank, dim) * 2 * dim  # the generic rank of the sum is min(R, d)
    dense = dim * dim
    return {
        "downlink_stacked_MB": modules * rank * 2 * dim * ELEMENT / 1e6,
        "downlink_canonical_MB": modules * canonical * ELEMENT / 1e6,
        "downlink_dense_MB": modules * dense * ELEMENT / 1e6,
        "downlink_exact_MB": modules * min(canonical, dense) * ELEMENT / 1e6,
    }


def spectrum(pair: LoraPair) -> Tensor:
    """Singular values of B A, descending: the canonical factors' while they are thin, else the dense delta's."""
    d_out, d_in = pair.b.shape[0], pair.a.shape[1]
    if pair.a.shape[0] < min(d_out, d_in):
        return singular_values(canonical_pair(pair, out_dtype=torch.float64))
    return torch.linalg.svdvals(pair.b @ pair.a).double()  # values only: no singular vectors are formed


def compressed_sizes(spectra: list[Tensor], dim: int) -> dict:
    """MB per round and the largest rank kept at each retained energy (dense, exact, where that is smaller)."""
    rows = {}
    for energy in ENERGIES:
        ranks = [kept_rank(s, DownlinkPolicy(energy=energy)) for s in spectra]
        numel = sum(min(k * 2 * dim, dim * dim) for k in ranks)
        rows[f"downlink_e{energy}_MB"], rows[f"rank_e{energy}"] = numel * ELEMENT / 1e6, max(ranks)
    return rows


def stacked_round(count: int, dim: int, modules: list[str]) -> tuple[list[LoraAdapter], list[float], LoraAdapter]:
    """The round's updates, their weights p_k and the stack (p_k s_k folded into A)."""
    updates = synthetic_updates(count, dim, modules)
    weights = client_weights([1 + k % 7 for k in range(count)])
    return updates, weights, flora_stack(updates, weights)


def householder_only(stacked: LoraAdapter) -> None:
    """The factorization as it was before CholeskyQR: Householder QR of every module (the baseline)."""
    for pair in stacked.pairs.values():
        householder_svd(pair.a.double(), pair.b.double())


def warm_changes(updates: list[LoraAdapter], weights: list[float]) -> dict[str, dict[str, LoraPair]]:
    """flora-warm's round change sum_k p_k (s B_k A_k - removed_k), stacked two ways.

    Each client starts from a removed adapter shared by its rank (one start per rank) and moves
    it slightly: the stack cancels, so its factorization takes Householder QR. ``grouped`` is
    what ``exact_change`` builds (one term per distinct start), ``per_client`` the stack with
    every client's removed copy (what it built before): R + sum(RANKS) wide against 2R.
    """
    gen = torch.Generator().manual_seed(1)
    starts = {u.rank: LoraAdapter({m: LoraPair(torch.randn_like(p.a), torch.randn_like(p.b)) for m, p in u.pairs.items()}, u.scaling)
              for u in updates}
    trained = [LoraAdapter({m: LoraPair(p.a + 0.01 * torch.randn(p.a.shape, generator=gen), p.b + 0.01 * torch.randn(p.b.shape, generator=gen))
                            for m, p in starts[u.rank].pairs.items()}, u.scaling) for u in updates]
    removed = [starts[u.rank] for u in updates]
    grouped = exact_change(trained, weights, removed)
    per_client = flora_stack([*trained, *removed], [*weights, *(-p for p in weights)])
    return {"grouped": grouped.pairs, "per_client": per_client.pairs}


def measure_times(count: int, dim: int, modules: list[str], repeats: int, log) -> dict:
    """Time reading, stacking, factorizing and merging K updates for one layer's modules."""
    updates, weights, stacked = stacked_round(count, dim, modules)
    base = {m: torch.randn(dim, dim) for m in modules}
    nbytes = sum(t.numel() * t.element_size() for u in updates for p in u.pairs.values() for t in p)
    rank = total_rank(count)
    read_s = median_seconds(lambda: read_once(updates), repeats)
    write_s = median_seconds(lambda: write_fresh(nbytes), repeats)
    stack_s = median_seconds(lambda: flora_stack(updates, weights), repeats)
    log(f"K={count}: stack {stack_s:.3g} s")
    merge_s = median_seconds(lambda: merged_weights(base, stacked), repeats)
    log(f"K={count}: merge {merge_s:.3g} s")
    factorize_s = median_seconds(lambda: plan_downlink(stacked.pairs), repeats)
    log(f"K={count}: factorize {factorize_s:.3g} s")
    householder_s = median_seconds(lambda: householder_only(stacked), repeats) if rank < dim / 2 else None
    warm = {key: median_seconds(lambda: plan_downlink(pairs), repeats) for key, pairs in warm_changes(updates, weights).items()}
    log(f"K={count}: Householder only {householder_s} s, flora-warm change {warm}")
    sent_mb = update_numel(plan_downlink(stacked.pairs).update) * ELEMENT / 1e6
    analytic = analytic_sizes(rank, dim, len(modules))
    if abs(sent_mb - analytic["downlink_exact_MB"]) > 1e-9:
        raise AssertionError(f"K={count}: the planned downlink is {sent_mb} MB, the analytic size {analytic['downlink_exact_MB']} MB")
    return {
        "K": count,
        "sum_of_ranks": rank,
        "update_MB": nbytes / 1e6,
        "read_s": read_s,
        "read_GBps": nbytes / read_s / 1e9,
        "write_GBps": nbytes / write_s / 1e9,
        "stack_s": stack_s,
        "stack_GBps": nbytes / stack_s / 1e9,
        "stack_vs_read": read_s / stack_s,
        "stack_vs_write": write_s / stack_s,
        "merge_s": merge_s,
        "merge_s_per_1k_rank": merge_s / rank * 1000,
        "factorize_s": factorize_s,
        "factorize_vs_merge": factorize_s / merge_s,
        "householder_s": householder_s,
        "warm_grouped_s": warm["grouped"],
        "warm_per_client_s": warm["per_client"],
        "warm_grouped_vs_merge": warm["grouped"] / merge_s,
        "layer_total_s": stack_s + merge_s,
        "model_32_layers_s": (stack_s + merge_s) * LAYERS_IN_7B,
        "downlink_sent_MB": sent_mb,
    }


def measure_sizes(count: int, dim: int, modules: list[str], compress: bool, log) -> dict:
    """Downlink MB per round for K clients: the exact forms from R, the compressed ones from the spectra."""
    row = {"K": count, "sum_of_ranks": total_rank(count), **analytic_sizes(total_rank(count), dim, len(modules))}
    row.update({f"downlink_e{e}_MB": None for e in ENERGIES} | {f"rank_e{e}": None for e in ENERGIES})
    if compress:
        clock = time.perf_counter()
        _, _, stacked = stacked_round(count, dim, modules)
        row.update(compressed_sizes([spectrum(pair) for pair in stacked.pairs.values()], dim))
        log(f"K={count}: spectra in {time.perf_counter() - clock:.1f} s")
    return row


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a x + b and its R^2: how linear merge time is in the sum of ranks."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    (slope, intercept) = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1).tolist()
    residual = y - (slope * x + intercept)
    r2 = 1.0 - float(residual.pow(2).sum() / (y - y.mean()).pow(2).sum()) if len(xs) > 1 else 1.0
    return slope, intercept, r2


def plot(timed: list[dict], sizes: list[dict], path) -> None:
    """Left: merge, stack and factorize time against R. Right: downlink MB per round against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cost, down) = plt.subplots(1, 2, figsize=(11, 4))
    ranks = [r["sum_of_ranks"] for r in timed]
    for key, label in (("merge_s", "merge (B_g A_g into W)"), ("stack_s", "stack"), ("factorize_s", "factorize (exact downlink)"),
                       ("read_s", "baseline: read bytes once")):
        cost.plot(ranks, [r[key] for r in timed], marker="o", label=label)
    cost.set(xscale="log", yscale="log", xlabel="sum of client ranks R", ylabel="seconds per layer (q_proj + v_proj)")
    cost.set_title("Aggregation cost, Llama-7B-shaped layer")
    cost.legend()
    clients = [r["K"] for r in sizes]
    for key, label in (("downlink_stacked_MB", "stacked (before)"), ("downlink_canonical_MB", "canonical factors"),
                       ("downlink_dense_MB", "dense delta"), ("downlink_exact_MB", "exact downlink (smaller form)"),
                       *((f"downlink_e{e}_MB", f"compressed, energy {e}") for e in ENERGIES)):
        points = [(k, r[key]) for k, r in zip(clients, sizes) if r[key] is not None]
        if points:
            down.plot(*zip(*points), marker="o", label=label)
    down.set(xscale="log", yscale="log", xlabel="clients per round K", ylabel="downlink MB per client per layer")
    down.set_title("Downlink per round")
    down.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_counts(text: str) -> list[int]:
    return [int(k) for k in text.split(",") if k.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,30,100,300,1000", help="K values of the downlink byte counts")
    parser.add_argument("--timed-clients", default="10,30,100", help="K values timed (stack, factorize, merge)")
    parser.add_argument("--dim", type=int, default=4096, help="d_in = d_out of each module (Llama-7B: 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median; after one warm-up)")
    parser.add_argument("--compress-max-k", type=int, default=1000, help="largest K whose compressed downlink is computed")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.timed_clients, args.dim, args.repeats = "2,5,40", "2,5", 64, 1
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    timed = [measure_times(k, args.dim, MODULES, args.repeats, log) for k in parse_counts(args.timed_clients)]
    sizes = [measure_sizes(k, args.dim, MODULES, k <= args.compress_max_k, log) for k in parse_counts(args.clients)]
    slope, intercept, r2 = linear_fit([r["sum_of_ranks"] for r in timed], [r["merge_s"] for r in timed])

    print(f"\nPer layer (q_proj + v_proj, {args.dim}x{args.dim}, float32); x{LAYERS_IN_7B} for a 7B model.")
    print(format_table(timed, ["K", "sum_of_ranks", "update_MB", "read_GBps", "write_GBps", "stack_GBps", "stack_vs_read",
                               "stack_vs_write", "merge_s", "merge_s_per_1k_rank", "model_32_layers_s"]))
    print(f"\nmerge_s = {slope * 1000:.4g} s per 1000 ranks * R + {intercept:.3g} s   (R^2 = {r2:.4f}: linear in R)")
    print("\nStack, factorize (planning the exact downlink) and merge, same run")
    print(format_table(timed, ["K", "sum_of_ranks", "stack_s", "factorize_s", "householder_s", "merge_s", "factorize_vs_merge",
                               "warm_grouped_s", "warm_per_client_s", "warm_grouped_vs_merge", "downlink_sent_MB"]))
    print("\nDownlink per round, client and layer (MB, float32)")
    print(format_table(sizes, ["K", "sum_of_ranks", "downlink_stacked_MB", "downlink_canonical_MB", "downlink_dense_MB",
                               "downlink_exact_MB", *(f"downlink_e{e}_MB" for e in ENERGIES), *(f"rank_e{e}" for e in ENERGIES)]))
    print(f"(canonical factors are smaller than the dense delta while R < d_out*d_in/(d_out+d_in) = {args.dim // 2})")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")

    fit = {"s_per_rank": slope, "intercept_s": intercept, "r2": r2}
    payload = {"dim": args.dim, "repeats": args.repeats, "rows": timed, "downlink": sizes, "merge_fit": fit,
               "wall_seconds": time.perf_counter() - start, "load_average_1_5_15_min_at_end": os.getloadavg()}
    path = write_results("aggregate", payload, args.out)
    plot(timed, sizes, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
