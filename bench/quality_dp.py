"""Quality under client-level DP (issue 31): held-out loss after --rounds rounds at each epsilon.

The regime of ``bench/quality.py`` (stories260K, the 10 non-IID Dolly clients of ../shared, each
subsampled with a validation set carved from every client's share; the built-in model and sample
data without ../shared), equal ranks, every client in every round, through ``flora.sim``'s engine
with ``SimConfig.privacy``: each round is the server's private release
(``flora.common.privacy.private_round``). For each method, release kind and target epsilon the
noise multiplier sigma is the smallest the accountant (``flora.common.privacy.accountant``, RDP,
replace-one, no sampling since every client takes part) allows for the whole run at --delta;
every client's change is clipped to --clip-norm. ``--split N`` splits every client's data into N
clients (K = 10 N) to show how DP improves with more data holders. Also the downlink values of
the last round's release, sketch against dense.

    python -m bench.quality_dp --workers 2                     # K = 10, the table in bench/README.md
    python -m bench.quality_dp --split 10 --methods flora-warm  # K = 100
    python -m bench.quality_dp --smoke                          # seconds: built-in model and data
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from bench.quality import load_material
from bench.report import RESULTS, write_results
from flora.client.trainer import TrainConfig
from flora.common.basemodel import load_model
from flora.common.downlink import plan_downlink
from flora.common.methods import get_method
from flora.common.privacy.accountant import sigma_for_epsilon
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.privacy.private_round import Privacy, clip_inputs, release
from flora.common.robust import RobustPolicy
from flora.common.privacy.release import release_passes
from flora.common.tables import format_table
from flora.common.update import update_numel
from flora.sim.engine import ClientData, SimConfig, run_method
from flora.sim.federation import Federation


@dataclass(frozen=True)
class Run:
    """One line of the table: a method, a release kind ("none": no DP) and a target epsilon."""

    method: str
    release: str
    epsilon: float | None
    sigma: float | None


def plan(args: argparse.Namespace, clients: int) -> list[Run]:
    """No DP, then every release kind at every epsilon (ffa once per epsilon: it releases its B sum)."""
    runs = []
    for method in args.methods:
        runs.append(Run(method, "none", None, None))
        trains_a = get_method(method).trains_a
        for release in args.releases if trains_a else args.releases[:1]:
            passes = release_passes(release, trains_a)
            for epsilon in args.epsilons:
                sigma = sigma_for_epsilon(epsilon, clients, clients, args.rounds, passes, args.delta)
                runs.append(Run(method, release if trains_a else "b-sum", epsilon, sigma))
    return runs


def split(federation: Federation, parts: int) -> list[ClientData]:
    """Every client's training data dealt into ``parts`` clients (K x parts data holders)."""
    return [ClientData(f"{c.name}-{i}", c.train[i::parts]) for c in federation.clients for i in range(parts)]


def run_one(run: Run, args: argparse.Namespace, base_model: str, clients: list[ClientData], validation) -> dict:
    """One run from a fresh copy of the base: its final loss and last release's downlink values."""
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    local = TrainConfig(max_steps=args.local_steps, batch_size=args.batch_size, learning_rate=args.learning_rate, device="cpu")
    privacy = None if run.sigma is None else Privacy(run.sigma, args.clip_norm, "dense" if run.release == "b-sum" else run.release, args.seed)
    config = SimConfig(run.method, (args.rank,) * len(clients), args.rounds, local, seed=args.seed, privacy=privacy)
    start, loss, values = time.perf_counter(), math.nan, None
    for outcome in run_method(load_model(base_model), clients, validation, config):
        loss = outcome.record.validation_loss
        if outcome.delta is not None:
            delta = outcome.delta
            values = update_numel(plan_downlink({n: p._replace(a=p.a * delta.scaling) for n, p in delta.pairs.items()}).update)
    print(f"{run.method} {run.release} epsilon {run.epsilon}: loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {**vars(run), "validation_loss": loss, "downlink_values": values}


def downlink_at_scale(shape: tuple[int, int], counts: list[int], rank: int, seed: int) -> list[dict]:
    """Values one module's downlink carries after a private release of K rank-r changes, sketch
    against dense, through the server's own release and ``plan_downlink`` (the learning runs'
    modules are too small for the sketch's factors to beat the dense form)."""
    d_out, d_in = shape
    method, generator, rows = get_method("flora"), torch.Generator().manual_seed(seed), []
    for count in counts:
        updates = [LoraAdapter({"module": LoraPair(torch.randn(rank, d_in, generator=generator),
                                                   torch.randn(d_out, rank, generator=generator) * 1e-3)}, 1.0)
                   for _ in range(count)]
        clipped = clip_inputs(method, None, updates, [1.0] * count, RobustPolicy(max_weight_share=None), 1.0)
        row = {"module": f"{d_out} x {d_in}", "clients": count, "rank": rank}
        for kind in ("sketch", "dense"):
            released = release(method, None, clipped, Privacy(1.0, 1.0, kind, seed), 1, torch.Generator().manual_seed(seed))
            row[f"{kind} values"] = update_numel(plan_downlink(released.change.pairs).update)
        rows.append(row)
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="flora-warm,flora,ffa")
    parser.add_argument("--releases", default="sketch,dense")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-norm", type=float, default=1.0,
                        help="C: each client's change is clipped to it (about half the 2.0-2.5 a client changes in a round here)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--split", type=int, default=1, help="split every client's data into this many clients")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--cutoff", type=int, default=128)
    parser.add_argument("--examples-per-client", type=int, default=100)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--downlink-shape", default="2048x2048", help="module shape of the downlink comparison")
    parser.add_argument("--downlink-clients", default="10,100", help="clients K of the downlink comparison")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the built-in model and data, for CI")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.releases = [r.strip() for r in args.releases.split(",") if r.strip()]
    args.epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    args.downlink_shape = tuple(int(d) for d in args.downlink_shape.split("x"))
    args.downlink_clients = [int(k) for k in args.downlink_clients.split(",") if k.strip()]
    for method in args.methods:
        if (refusal := get_method(method).dp_refusal) is not None:
            parser.error(f"--methods: {method} cannot run under differential privacy: {refusal}")
    if args.smoke:
        args.rounds, args.local_steps, args.cutoff, args.examples_per_client, args.rank = 2, 2, 48, 12, 2
        args.epsilons, args.methods = args.epsilons[-1:], args.methods[:1]
        args.downlink_shape, args.downlink_clients = (96, 64), [3]
    args.mixed, args.mmlu_questions = (args.rank,) * 3, 0  # load_material's: three generated clients under --smoke
    return args


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flora-quality-dp-") as tmp:
        base_model, data, federation, _ = load_material(args, Path(tmp))
    clients = split(federation, args.split) if args.split > 1 else list(federation.clients)
    runs = plan(args, len(clients))
    print(f"base model {base_model}, data {data}: {len(clients)} clients, {len(federation.validation)} validation examples")
    args.downlink = downlink_at_scale(args.downlink_shape, args.downlink_clients, args.rank, args.seed)
    print("\nDownlink of one module after a private release (values sent; dense = out x in)")
    print(format_table([{k: str(v) for k, v in row.items()} for row in args.downlink], list(args.downlink[0])))
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, run, args, base_model, clients, federation.validation) for run in runs]
        for future in as_completed(futures):  # written after each run: an interrupted benchmark keeps what finished
            results.append(future.result())
            path = write(args, base_model, data, len(clients), results, time.perf_counter() - start)
    order = {(r.method, r.release, r.epsilon): i for i, r in enumerate(runs)}
    results.sort(key=lambda r: order[(r["method"], r["release"], r["epsilon"])])
    rows = [{"method": r["method"], "release": r["release"], "epsilon": "-" if r["epsilon"] is None else f"{r['epsilon']:g}",
             "sigma": "-" if r["sigma"] is None else f"{r['sigma']:.3g}",
             "noise std": "-" if r["sigma"] is None else f"{r['sigma'] * args.clip_norm / len(clients):.2e}",
             f"loss after {args.rounds}": f"{r['validation_loss']:.4f}", "downlink values": str(r["downlink_values"])}
            for r in results]
    print(f"\nHeld-out loss under client-level DP (delta {args.delta:g}, C {args.clip_norm:g}, K {len(clients)}, seed {args.seed})")
    print(format_table(rows, list(rows[0])))
    print(f"wrote {path}")


def write(args: argparse.Namespace, base_model: str, data: str, clients: int, results: list[dict], wall: float) -> Path:
    """quality-dp.json (quality-dp-k<K>.json with --split) with the runs finished so far."""
    payload = {"base_model": base_model, "data": data, "clients": clients,
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "mixed", "downlink")}, "runs": results,
               "downlink_at_scale": args.downlink,
               "wall_seconds": wall, "load_average_1_5_15_min_at_end": os.getloadavg()}
    return write_results("quality-dp" if args.split == 1 else f"quality-dp-k{clients}", payload, args.out)


if __name__ == "__main__":
    main()
