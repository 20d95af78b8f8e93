"""Quality: the FLoRA paper's comparison of held-out loss per round, at a size a 2-core CPU runs.

Base model stories260K and the 10 non-IID Dolly clients from ../shared (the built-in model and
generated sample data when ../shared is absent). Each client is subsampled, a fixed validation
set is carved from every client's share (the same for every run), and five runs train with the
same seeds, data and local steps through ``flora.sim``'s engine:

- centralized: one LoRA of the homogeneous rank on the union, as many steps per round as all
  clients together (the reference a federation tries to match);
- flora-homo / fedit-homo: every client at the homogeneous rank (fedit clients start each round
  from the shared global LoRA);
- flora-hetero / zeropad-hetero: ranks scaled to the model, e.g. 16,8,4,4,2,2,1,1,1,1.

The loss covers prompt and response (no prompt masking): with a cutoff this short, most Dolly
prompts of the closed-QA, summarisation and extraction clients fill the cutoff, so masking would
leave those clients nothing to train on.

    python -m bench.quality            # about 5 minutes on 2 cores
    python -m bench.quality --smoke    # seconds: built-in model and data, tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging as hf_logging

from bench.report import RESULTS, write_results
from flora.common.tables import format_table
from flora.client.trainer import TrainConfig
from flora.common.basemodel import BUILTIN_MODEL, load_model, load_tokenizer
from flora.sim.cli import parse_ranks
from flora.sim.engine import RoundRecord, SimConfig, run_method
from flora.sim.federation import DataOptions, Federation, client_files, load_federation, sample_files
from flora.sim.output import by_round, format_errors, plot_validation_loss

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_MODEL = SHARED / "models" / "stories260K"
SHARED_DATA = SHARED / "data" / "dolly-10clients"
GENERATED_CLIENTS = 10


@dataclass(frozen=True)
class Experiment:
    """One line of the comparison: a label, the aggregation method and the clients' ranks."""

    label: str
    method: str
    ranks: tuple[int, ...]


def experiments(clients: int, homogeneous: int, heterogeneous: tuple[int, ...]) -> list[Experiment]:
    """The paper's five runs for ``clients`` clients."""
    if len(heterogeneous) != clients:
        raise SystemExit(f"--heterogeneous-ranks gives {len(heterogeneous)} ranks for {clients} clients")
    same = (homogeneous,) * clients
    return [
        Experiment("centralized", "centralized", same),
        Experiment("flora-homo", "flora", same),
        Experiment("fedit-homo", "fedit", same),
        Experiment("flora-hetero", "flora", heterogeneous),
        Experiment("zeropad-hetero", "zeropad", heterogeneous),
    ]


def parse_args() -> argparse.Namespace:
    """Defaults sized to finish in about 5 minutes on 2 cores; --smoke shrinks everything for CI."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=20, help="optimiser steps per client and round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--cutoff", type=int, default=192, help="tokens per example")
    parser.add_argument("--examples-per-client", type=int, default=300, help="subsample of each client's file")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="of each client's subsample")
    parser.add_argument("--homogeneous-rank", type=int, default=8)
    parser.add_argument("--heterogeneous-ranks", default="16,8,4,4,2,2,1,1,1,1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for quality.json and quality.png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the built-in model and data, for CI")
    args = parser.parse_args()
    try:
        args.heterogeneous = parse_ranks(args.heterogeneous_ranks)
    except ValueError as exc:
        parser.error(str(exc))
    if args.smoke:
        args.rounds, args.local_steps, args.batch_size, args.cutoff, args.examples_per_client = 2, 2, 4, 64, 12
        args.homogeneous_rank, args.heterogeneous = 2, (4, 2, 1)
    return args


def load_material(args: argparse.Namespace, tmp: Path) -> tuple[str, str, Federation]:
    """Base model name, data description and the federation: ../shared, else the built-in fallback."""
    use_shared = not args.smoke and SHARED_MODEL.is_dir() and SHARED_DATA.is_dir()
    base_model = str(SHARED_MODEL) if use_shared else BUILTIN_MODEL
    options = DataOptions("alpaca", args.cutoff, False, args.examples_per_client, args.validation_fraction, args.seed)
    if use_shared:
        files, data = client_files(SHARED_DATA), str(SHARED_DATA)
    else:
        clients = len(args.heterogeneous) if args.smoke else GENERATED_CLIENTS
        files, data = sample_files(tmp, clients, args.examples_per_client, args.seed), "built-in sample data"
    return base_model, data, load_federation(files, load_tokenizer(base_model), options)


def run(
    args: argparse.Namespace, base_model: str, federation: Federation, plan: list[Experiment]
) -> dict[str, list[RoundRecord]]:
    """Every experiment on a fresh copy of the base model, printing rounds as they finish."""
    local = TrainConfig(max_steps=args.local_steps, batch_size=args.batch_size, learning_rate=args.learning_rate, device="cpu")
    runs = {}
    for experiment in plan:
        config = SimConfig(experiment.method, experiment.ranks, args.rounds, local, seed=args.seed)
        runs[experiment.label] = []
        for outcome in run_method(load_model(base_model), federation.clients, federation.validation, config):
            runs[experiment.label].append(outcome.record)
            print(f"{experiment.label:<15} round {outcome.record.round}: validation loss "
                  f"{outcome.record.validation_loss:.4f} ({outcome.record.seconds:.1f} s)", flush=True)
    return runs


def main() -> None:
    """Run the five experiments, print and write the comparison."""
    args = parse_args()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flora-quality-") as tmp:
        base_model, data, federation = load_material(args, Path(tmp))
    print(f"base model {base_model}, data {data}: {federation.summary()}")
    plan = experiments(len(federation.clients), args.homogeneous_rank, args.heterogeneous)
    runs = run(args, base_model, federation, plan)
    wall = time.perf_counter() - start
    loss_rows, columns = by_round(runs, "validation_loss")
    print("\nValidation loss of the global model by round (round 0 = base model)")
    print(format_table(loss_rows, columns))
    print("\nAggregation error |aggregate - sum p_k s_k B_k A_k|_F / |sum p_k s_k B_k A_k|_F by round")
    print(format_table(format_errors(runs), columns))
    print(f"\nwall time {wall:.0f} s")
    payload = {
        "base_model": base_model,
        "data": data,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "heterogeneous_ranks")}
        | {"template": "alpaca", "mask_prompt": False},
        "federation": federation.summary(),
        "experiments": {
            e.label: {"method": e.method, "ranks": list(e.ranks), "history": [r.to_json() for r in runs[e.label]]}
            for e in plan
        },
        "validation_loss_by_round": loss_rows,
        "wall_seconds": wall,
        "load_average_1_5_15_min_at_end": os.getloadavg(),  # > 2 on 2 cores: other work shared the CPU
    }
    path = write_results("quality", payload, args.out)
    title = f"held-out loss by round: {Path(base_model).name}, {len(federation.clients)} clients"
    plot_validation_loss(runs, path.with_suffix(".png"), title)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
