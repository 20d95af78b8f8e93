"""Cost of aggregation: FLoRA stacking + merge of K client updates for Llama-7B-shaped modules.

For each K, clients get ranks cycling through 4, 8, 16, 32, 64 (heterogeneous, as in the paper).
One transformer layer's q_proj and v_proj (4096 x 4096 in Llama-7B) are measured; a 32-layer
model costs 32 times the per-layer numbers (the layers are independent and identical in shape).
Baselines, measured in the same run: one pass reading the same update bytes (a reduction over
every tensor), and filling freshly allocated memory of the stacked adapter's size. Stacking reads
the updates once and writes them once into new memory, so its GB/s should sit near the slower of
the two (on VMs that return freed memory to the host, first-touch writes dominate).
Merging is a (d_out x R) @ (R x d_in) product, so its time should be linear in R = sum of ranks.

The downlink (what every client downloads per round): the stacked adapter (what servers sent
before), canonical factors (rank min(R, d)), the dense delta, the exact downlink the server
sends (per module the smaller of the two), and the compressed one at retained energy 0.99 and
0.95 (``flora.common.downlink``). ``factorize_s`` is the server's time to plan the exact downlink
(QR + SVD of the core, or the dense product when that is the smaller form), next to stacking and
merging. Compression needs the full SVD even where the dense form wins, so it is measured up to
``--compress-max-k`` (the SVD of a full-rank 4096 x 4096 aggregate takes minutes on 2 cores).

    python -m bench.aggregate            # K = 10 .. 1000 (about 4 GB of RAM at K = 1000)
    python -m bench.aggregate --smoke    # seconds, tiny shapes
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from bench.report import RESULTS, median_seconds, write_results
from flora.common.tables import format_table
from flora.common.aggregation import flora_stack
from flora.common.canonical import canonical_pair, singular_values
from flora.common.downlink import DownlinkPolicy, kept_rank, plan_downlink
from flora.common.update import update_numel
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling
from flora.common.merge import merged_weights
from flora.common.weights import client_weights

RANKS = (4, 8, 16, 32, 64)
LAYERS_IN_7B = 32
ENERGIES = (0.99, 0.95)


def synthetic_updates(count: int, dim: int, modules: list[str], seed: int = 0) -> list[LoraAdapter]:
    """K client updates with ranks cycling through RANKS and alpha = 2 r."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for rank in itertools.islice(itertools.cycle(RANKS), count):
        pairs = {m: LoraPair(torch.randn(rank, dim, generator=gen), torch.randn(dim, rank, generator=gen)) for m in modules}
        updates.append(LoraAdapter(pairs, lora_scaling(rank, 2.0 * rank)))
    return updates


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


def downlink_sizes(stacked: LoraAdapter, compress: bool) -> dict:
    """Bytes of each downlink form for one round (float32), and the compressed ranks."""
    element = 4
    rows = {"downlink_stacked_MB": sum(p.a.numel() + p.b.numel() for p in stacked.pairs.values()) * element / 1e6}
    canonical = dense = 0
    for pair in stacked.pairs.values():
        d_out, d_in = pair.b.shape[0], pair.a.shape[1]
        canonical += min(pair.a.shape[0], d_out, d_in) * (d_out + d_in)  # the generic rank of the sum
        dense += d_out * d_in
    rows["downlink_canonical_MB"] = canonical * element / 1e6
    rows["downlink_dense_MB"] = dense * element / 1e6
    rows["downlink_exact_MB"] = update_numel(plan_downlink(stacked.pairs).update) * element / 1e6
    for energy in ENERGIES:
        rows[f"downlink_e{energy}_MB"] = rows[f"rank_e{energy}"] = None
    if not compress:
        return rows
    spectra = [(pair, singular_values(canonical_pair(pair, out_dtype=torch.float64))) for pair in stacked.pairs.values()]
    for energy in ENERGIES:
        numel, ranks = 0, []
        for pair, s in spectra:
            d_out, d_in = pair.b.shape[0], pair.a.shape[1]
            k = kept_rank(s, DownlinkPolicy(energy=energy))
            ranks.append(k)
            numel += min(k * (d_out + d_in), d_out * d_in)  # dense, exact, when it is smaller still
        rows[f"downlink_e{energy}_MB"], rows[f"rank_e{energy}"] = numel * element / 1e6, max(ranks)
    return rows


def measure(count: int, dim: int, modules: list[str], repeats: int, compress: bool = True) -> dict:
    """Time reading, stacking and merging K updates for one layer's modules."""
    updates = synthetic_updates(count, dim, modules)
    weights = client_weights([1 + k % 7 for k in range(count)])
    base = {m: torch.randn(dim, dim) for m in modules}
    nbytes = sum(t.numel() * t.element_size() for u in updates for p in u.pairs.values() for t in p)
    total_rank = sum(u.rank for u in updates)

    read_s = median_seconds(lambda: read_once(updates), repeats)
    write_s = median_seconds(lambda: write_fresh(nbytes), repeats)
    stack_s = median_seconds(lambda: flora_stack(updates, weights), repeats)
    stacked = flora_stack(updates, weights)
    merge_s = median_seconds(lambda: merged_weights(base, stacked), repeats)
    factorize_s = median_seconds(lambda: plan_downlink(stacked.pairs), repeats)
    return {
        "K": count,
        "sum_of_ranks": total_rank,
        "update_MB": nbytes / 1e6,
        "read_s": read_s,
        "read_GBps": nbytes / read_s / 1e9,
        "write_GBps": nbytes / write_s / 1e9,
        "stack_s": stack_s,
        "stack_GBps": nbytes / stack_s / 1e9,
        "stack_vs_read": read_s / stack_s,
        "stack_vs_write": write_s / stack_s,
        "merge_s": merge_s,
        "merge_s_per_1k_rank": merge_s / total_rank * 1000,
        "factorize_s": factorize_s,
        "factorize_vs_merge": factorize_s / merge_s,
        "layer_total_s": stack_s + merge_s,
        "model_32_layers_s": (stack_s + merge_s) * LAYERS_IN_7B,
        **downlink_sizes(stacked, compress),
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a x + b and its R^2: how linear merge time is in the sum of ranks."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    (slope, intercept) = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1).tolist()
    residual = y - (slope * x + intercept)
    r2 = 1.0 - float(residual.pow(2).sum() / (y - y.mean()).pow(2).sum()) if len(xs) > 1 else 1.0
    return slope, intercept, r2


def plot(rows: list[dict], path) -> None:
    """Left: merge, stack and factorize time against R. Right: downlink MB per round against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cost, down) = plt.subplots(1, 2, figsize=(11, 4))
    ranks = [r["sum_of_ranks"] for r in rows]
    for key, label in (("merge_s", "merge (B_g A_g into W)"), ("stack_s", "stack"), ("factorize_s", "factorize (exact downlink)"),
                       ("read_s", "baseline: read bytes once")):
        cost.plot(ranks, [r[key] for r in rows], marker="o", label=label)
    cost.set(xscale="log", yscale="log", xlabel="sum of client ranks R", ylabel="seconds per layer (q_proj + v_proj)")
    cost.set_title("Aggregation cost, Llama-7B-shaped layer")
    cost.legend()
    clients = [r["K"] for r in rows]
    for key, label in (("downlink_stacked_MB", "stacked (before)"), ("downlink_canonical_MB", "canonical factors"),
                       ("downlink_dense_MB", "dense delta"), ("downlink_exact_MB", "exact downlink (smaller form)"),
                       *((f"downlink_e{e}_MB", f"compressed, energy {e}") for e in ENERGIES)):
        points = [(k, r[key]) for k, r in zip(clients, rows) if r[key] is not None]
        if points:
            down.plot(*zip(*points), marker="o", label=label)
    down.set(xscale="log", yscale="log", xlabel="clients per round K", ylabel="downlink MB per client per layer")
    down.set_title("Downlink per round")
    down.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,30,100,300,1000", help="comma-separated K values")
    parser.add_argument("--dim", type=int, default=4096, help="d_in = d_out of each module (Llama-7B: 4096)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compress-max-k", type=int, default=100, help="largest K whose compressed downlink is measured")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.dim, args.repeats = "2,5", 64, 1
    modules = ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]
    counts = [int(k) for k in args.clients.split(",")]
    rows = [measure(k, args.dim, modules, args.repeats, compress=k <= args.compress_max_k) for k in counts]
    slope, intercept, r2 = linear_fit([r["sum_of_ranks"] for r in rows], [r["merge_s"] for r in rows])

    print(f"Per layer (q_proj + v_proj, {args.dim}x{args.dim}, float32); x{LAYERS_IN_7B} for a 7B model.")
    print(format_table(rows, ["K", "sum_of_ranks", "update_MB", "read_GBps", "write_GBps", "stack_GBps", "stack_vs_read", "stack_vs_write", "merge_s", "merge_s_per_1k_rank", "model_32_layers_s"]))
    print(f"\nmerge_s = {slope * 1000:.4g} s per 1000 ranks * R + {intercept:.3g} s   (R^2 = {r2:.4f}: linear in R)")
    print("\nDownlink per round, client and layer (MB, float32); factorize = planning the exact downlink")
    print(format_table(rows, ["K", "sum_of_ranks", "downlink_stacked_MB", "downlink_canonical_MB", "downlink_dense_MB",
                              "downlink_exact_MB", *(f"downlink_e{e}_MB" for e in ENERGIES), *(f"rank_e{e}" for e in ENERGIES)]))
    print(format_table(rows, ["K", "sum_of_ranks", "stack_s", "factorize_s", "merge_s", "factorize_vs_merge"]))
    crossover = args.dim * args.dim // (2 * args.dim)
    print(f"(canonical factors are smaller than the dense delta while R < d_out*d_in/(d_out+d_in) = {crossover})")

    fit = {"s_per_rank": slope, "intercept_s": intercept, "r2": r2}
    path = write_results("aggregate", {"dim": args.dim, "rows": rows, "merge_fit": fit}, args.out)
    plot(rows, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
