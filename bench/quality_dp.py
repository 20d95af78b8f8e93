"""Quality under client-level DP (issue 31): held-out loss after --rounds rounds, a grid over K.

The data and model of ``bench/quality.py`` (stories260K, the 10 non-IID Dolly clients of
../shared, each subsampled, a validation set carved from every client's share; the built-in
model and sample data without ../shared), equal ranks, through ``flora.sim``'s engine with
``SimConfig.privacy``: each round is the server's private release
(``flora.common.privacy.private_round``). ``--split 1,10`` runs the grid at K = 10 and at
K = 100: every client's training examples dealt round-robin into 10 clients (the same data and
validation set, ten times the data holders). Each round takes --clients-per-round of the K
clients (default all), sampled as flora samples them (seeded, uniformly without replacement).
For each K, method, release kind and target epsilon, sigma is the smallest the accountant
(``flora.common.privacy.accountant``, RDP, replace-one, sampled without replacement) allows
for the whole run at --delta; every client's change is clipped to --clip-norm. Also the
downlink per round and client of a private release, sketch against dense, for the runs' modules
and a 1B shape's.

    python -m bench.quality_dp --workers 3 --clients-per-round 10   # the grid in bench/README.md
    python -m bench.quality_dp --first-seed 1 --epsilons 8 --clients-per-round 10  # another seed of a part
    python -m bench.quality_dp --from-results bench/results/quality-dp-grid*.json  # one table of several
    python -m bench.quality_dp --smoke                                # seconds: built-in model and data
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from bench.quality import load_material
from bench.quality_dp_report import print_results
from bench.report import RESULTS, write_results
from bench.scale import SHAPES
from flora.client.trainer import TrainConfig
from flora.common.basemodel import load_model, target_module_shapes
from flora.common.downlink import plan_downlink
from flora.common.methods import get_method
from flora.common.privacy.accountant import sigma_for_epsilon
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.privacy.private_round import Privacy, clip_inputs, release
from flora.common.robust import RobustPolicy
from flora.common.privacy.release import release_passes
from flora.common.update import update_numel
from flora.sim.engine import ClientData, SimConfig, run_method

BYTES_PER_VALUE = 4  # the downlink's float32


@dataclass(frozen=True)
class Run:
    """One cell of the grid and seed: K clients, a method, a release kind ("none": no DP), a target epsilon."""

    clients: int
    per_round: int  # clients sampled each round (seeded, without replacement, as the accountant assumes)
    method: str
    release: str
    epsilon: float | None
    sigma: float | None
    seed: int


def plan(args: argparse.Namespace, counts: list[int]) -> list[Run]:
    """Every K of ``counts``, method, release and epsilon (ffa once per epsilon: it releases its B sum) for each seed.

    Ordered so that an interrupted grid has its most telling cells: K ascending, and within a K
    first the no-DP and largest-epsilon cells of every method, then the others."""
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for clients in counts:
            per_round = min(clients, args.clients_per_round or clients)
            for method in args.methods:
                if args.baseline:
                    runs.append(Run(clients, per_round, method, "none", None, None, seed))
                trains_a = get_method(method).trains_a
                for release in args.releases if trains_a else args.releases[:1]:
                    passes = release_passes(release, trains_a)
                    for epsilon in args.epsilons:
                        sigma = sigma_for_epsilon(epsilon, clients, per_round, args.rounds, passes, args.delta)
                        runs.append(Run(clients, per_round, method, release if trains_a else "b-sum", epsilon, sigma, seed))
    top = max(args.epsilons, default=None)
    late = {m: i for i, m in enumerate(args.methods)}
    return sorted(runs, key=lambda r: (r.seed, r.clients, r.epsilon not in (None, top), late[r.method] if r.epsilon
                                       not in (None, top) else 0, -(r.epsilon or math.inf)))


def split(clients: list[ClientData], parts: int) -> list[ClientData]:
    """Every client's training data dealt round-robin into ``parts`` clients (K x parts data holders):
    deterministic, and the union (so the total data and the validation set) is unchanged."""
    return [ClientData(f"{c.name}-{i}", c.train[i::parts]) for c in clients for i in range(parts)]


def run_one(run: Run, args: argparse.Namespace, base_model: str, clients: list[ClientData], validation) -> dict:
    """One run from a fresh copy of the base: its final loss and last release's downlink values."""
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    local = TrainConfig(max_steps=args.local_steps, batch_size=args.batch_size, learning_rate=args.learning_rate, device="cpu")
    privacy = None if run.sigma is None else Privacy(run.sigma, args.clip_norm, "dense" if run.release == "b-sum" else run.release, run.seed)
    config = SimConfig(run.method, (args.rank,) * len(clients), args.rounds, local, clients_per_round=run.per_round,
                       seed=run.seed, privacy=privacy)
    start, loss, values = time.perf_counter(), math.nan, None
    for outcome in run_method(load_model(base_model), clients, validation, config):
        loss = outcome.record.validation_loss
        if outcome.delta is not None:
            delta = outcome.delta
            values = update_numel(plan_downlink({n: p._replace(a=p.a * delta.scaling) for n, p in delta.pairs.items()}).update)
    seconds = time.perf_counter() - start
    print(f"K {run.clients} {run.method} {run.release} epsilon {run.epsilon} seed {run.seed}: loss {loss:.4f} ({seconds:.0f} s)",
          flush=True)
    return {**vars(run), "validation_loss": loss, "downlink_values": values, "seconds": seconds}


def module_set(name: str, model_shapes: dict[str, tuple[int, int]]) -> dict[tuple[int, int], int]:
    """{(out, in): count} of a downlink comparison's target modules: "model" (the runs' base),
    a ``bench.scale`` shape (q_proj, v_proj of every layer) or one module "OUTxIN"."""
    if name == "model":
        return dict(Counter(model_shapes.values()))
    if name in SHAPES:
        shape = SHAPES[name]
        kv = shape.kv_heads * (shape.hidden // shape.heads)
        return dict(Counter({(shape.hidden, shape.hidden): shape.layers, (kv, shape.hidden): shape.layers}))
    out, _, inner = name.partition("x")
    if not (out.isdigit() and inner.isdigit() and int(out) > 0 and int(inner) > 0):
        raise ValueError(f"--downlink-sets: {name!r} is not model, one of {', '.join(SHAPES)} or OUTxIN")
    return {(int(out), int(inner)): 1}


def module_values(shape: tuple[int, int], count: int, rank: int, seed: int) -> dict[str, int]:
    """Values one module's downlink carries after a private release of ``count`` rank-r changes,
    sketch against dense, through the server's own release and ``plan_downlink``."""
    d_out, d_in = shape
    method, generator = get_method("flora"), torch.Generator().manual_seed(seed)
    updates = [LoraAdapter({"module": LoraPair(torch.randn(rank, d_in, generator=generator),
                                               torch.randn(d_out, rank, generator=generator) * 1e-3)}, 1.0)
               for _ in range(count)]
    clipped = clip_inputs(method, None, updates, [1.0] * count, RobustPolicy(max_weight_share=None), 1.0)
    values = {}
    for kind in ("sketch", "dense"):
        released = release(method, None, clipped, Privacy(1.0, 1.0, kind, seed), 1, torch.Generator().manual_seed(seed))
        values[kind] = update_numel(plan_downlink(released.change.pairs).update)
    return values


def downlink_at_scale(sets: list[str], model_shapes: dict[str, tuple[int, int]], counts: list[int], rank: int,
                      seed: int) -> list[dict]:
    """Per round and per client (every client downloads the same update), the float32 bytes of the
    update after a private release of K rank-r changes, sketch against dense, for each module set."""
    rows = []
    for name in sets:
        modules = module_set(name, model_shapes)
        for count in counts:
            per_shape = {shape: module_values(shape, count, rank, seed) for shape in modules}
            sketch, dense = (sum(per_shape[s][kind] * n for s, n in modules.items()) for kind in ("sketch", "dense"))
            rows.append({"modules": name, "shapes": ", ".join(f"{n} x {o}x{i}" for (o, i), n in modules.items()),
                         "clients": count, "rank": rank, "sketch bytes": BYTES_PER_VALUE * sketch,
                         "dense bytes": BYTES_PER_VALUE * dense, "sketch / dense": round(sketch / dense, 4)})
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="flora-warm,flora,ffa")
    parser.add_argument("--releases", default="sketch,dense")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each method without DP (--no-baseline: when another results file has it)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-norm", type=float, default=1.0,
                        help="C: each client's change is clipped to it (about what a client changes in a round here, or less)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--split", default="1,10",
                        help="deal every client's data into this many clients, one grid per value (1,10: K = 10 and 100)")
    parser.add_argument("--clients-per-round", type=int, default=None,
                        help="sample this many of the K clients each round (seeded, without replacement; the "
                             "accountant's sampled Gaussian); default every client")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--cutoff", type=int, default=128)
    parser.add_argument("--examples-per-client", type=int, default=100, help="of each of the 10 files, before --split")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="the data subsample and validation set; first run seed")
    parser.add_argument("--seeds", type=int, default=1, help="run seeds per cell")
    parser.add_argument("--first-seed", type=int, default=None,
                        help="first run seed when it differs from --seed (more seeds on the same data)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="quality-dp", help="results file name (<name>.json)")
    parser.add_argument("--downlink-sets", default="model,1b",
                        help="module sets of the downlink comparison: model (the runs' base), a bench.scale shape, OUTxIN")
    parser.add_argument("--downlink-clients", default="10,100", help="clients K of the downlink comparison")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the built-in model and data, for CI")
    parser.add_argument("--from-results", type=Path, nargs="+", help="print the grid of finished results files instead of running")
    args = parser.parse_args()
    try:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        args.releases = [r.strip() for r in args.releases.split(",") if r.strip()]
        args.epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
        args.split = [int(s) for s in args.split.split(",") if s.strip()]
        args.downlink_sets = [d.strip() for d in args.downlink_sets.split(",") if d.strip()]
        args.downlink_clients = [int(k) for k in args.downlink_clients.split(",") if k.strip()]
        for name in args.downlink_sets:
            module_set(name, {})
    except ValueError as exc:
        parser.error(str(exc))
    if args.clients_per_round is not None and args.clients_per_round < 1:
        parser.error(f"--clients-per-round {args.clients_per_round}: give a whole number >= 1")
    if not args.split or min(args.split) < 1:
        parser.error(f"--split {args.split}: give one or more whole numbers >= 1")
    for method in args.methods:
        if (refusal := get_method(method).dp_refusal) is not None:
            parser.error(f"--methods: {method} cannot run under differential privacy: {refusal}")
    if args.smoke:
        args.rounds, args.local_steps, args.cutoff, args.examples_per_client, args.rank = 2, 2, 48, 12, 2
        args.epsilons, args.methods, args.split = args.epsilons[-1:], args.methods[:1], [1, 2]
        args.downlink_sets, args.downlink_clients = ["model", "96x64"], [3]
    args.first_seed = args.seed if args.first_seed is None else args.first_seed
    args.mixed, args.mmlu_questions = (args.rank,) * 3, 0  # load_material's: three generated clients under --smoke
    return args


def main() -> None:
    """Run the grid (or read finished results back with --from-results) and print its tables."""
    args = parse_args()
    if args.from_results:
        print_results([json.loads(path.read_text()) for path in args.from_results])
        return
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flora-quality-dp-") as tmp:
        base_model, data, federation, _ = load_material(args, Path(tmp))
    grids = {len(federation.clients) * s: split(list(federation.clients), s) for s in args.split}
    runs = plan(args, list(grids))
    print(f"base model {base_model}, data {data}: K = {', '.join(map(str, grids))} clients, "
          f"{len(federation.validation)} validation examples, {len(runs)} runs")
    shapes = target_module_shapes(load_model(base_model))
    args.downlink = downlink_at_scale(args.downlink_sets, shapes, args.downlink_clients, args.rank, args.seed)
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, run, args, base_model, grids[run.clients], federation.validation) for run in runs]
        for future in as_completed(futures):  # written after each run: an interrupted benchmark keeps what finished
            results.append(future.result())
            payload = write(args, base_model, data, results, time.perf_counter() - start)
    print_results([json.loads(payload.read_text())])
    print(f"wrote {payload}")


def write(args: argparse.Namespace, base_model: str, data: str, results: list[dict], wall: float) -> Path:
    """<name>.json with the runs finished so far."""
    payload = {"base_model": base_model, "data": data,
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "mixed", "downlink", "from_results")},
               "runs": results, "downlink_at_scale": args.downlink,
               "wall_seconds": wall, "load_average_1_5_15_min_at_end": os.getloadavg()}
    return write_results(args.name, payload, args.out)


if __name__ == "__main__":
    main()
