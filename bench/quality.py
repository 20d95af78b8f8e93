"""Quality: held-out loss per round of every aggregation method, with seeds, at a size a 2-core CPU runs.

Base model stories260K and the 10 non-IID Dolly clients from ../shared (the built-in model and
generated sample data when ../shared is absent). Each client is subsampled, a fixed validation
set is carved from every client's share (the same records for every method and seed), and every
run trains through ``flora.sim``'s engine with the same data, local steps and per-seed LoRA
seeds, so runs differ by their method (and seed) alone. Two settings:

- equal ranks (--equal-rank, 4): every method, with centralized as the reference (one LoRA of
  that rank on the union, as many steps per round as all clients together);
- mixed ranks (--mixed-ranks, 16,8,4,4,2,2,1,1,1,1): every method that takes mixed ranks.

--downlinks runs every method again with each compressed downlink (``flora.sim.downlink``: the
server's energy threshold / rank cap / dtype with the remainder carried), labelled
``method@policy-setting`` (``flora@e0.95-equal``), same seeds, and pairs each with its exact run.

Every method runs --rounds rounds for each of --seeds seeds; the --long-runs go on to --long-rounds
(their first --rounds rounds are the short run: each round's learning-rate schedule restarts, so
a round's result does not depend on how many follow). After the last round of each run, MMLU
accuracy by comparing each choice's loss (``bench.mmlu``) on --mmlu-questions questions spread
over ../shared/data/mmlu-1444. Runs go to --workers processes (each one torch thread).

The loss covers prompt and response (no prompt masking): with a cutoff this short, most Dolly
prompts of the closed-QA, summarisation and extraction clients fill the cutoff, so masking would
leave those clients nothing to train on.

    python -m bench.quality --workers 2    # the table in bench/README.md (about 40 CPU-minutes)
    python -m bench.quality --smoke        # seconds: built-in model and data, tiny sizes (CI)
    python -m bench.quality --from-runs bench/results/quality-runs.jsonl   # report an interrupted run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from bench.mmlu import Question, accuracy, load_questions
from bench.quality_report import base_comparisons, comparisons, downlink_comparisons, summary_rows
from bench.report import RESULTS, write_results
from flora.client.trainer import TrainConfig
from flora.common.basemodel import BUILTIN_MODEL, load_model, load_tokenizer
from flora.common.methods import METHODS
from flora.common.tables import format_table
from flora.sim.cli import parse_methods, parse_ranks
from flora.sim.bases import client_bases
from flora.sim.downlink import parse_policy, policy_label
from flora.sim.engine import CENTRALIZED, RoundRecord, SimConfig, run_method
from flora.sim.federation import DataOptions, Federation, client_files, load_federation, sample_files
from flora.sim.output import by_round, format_errors, plot_validation_loss

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_MODEL = SHARED / "models" / "stories260K"
SHARED_DATA = SHARED / "data" / "dolly-10clients"
SHARED_MMLU = SHARED / "data" / "mmlu-1444" / "mmlu_test_1444.json"
GENERATED_CLIENTS = 10
MMLU_TOKENS = 256  # an over-long question loses its start, never the scored answer


@dataclass(frozen=True)
class Experiment:
    """One line of the comparison: a label, the method, the clients' ranks and how many rounds."""

    label: str
    method: str
    ranks: tuple[int, ...]
    rounds: int
    downlink: str = "exact"  # a flora.sim.downlink policy label
    bases: str = "none"  # the clients' bases, "+"-joined and cycled (flora.sim.bases): none, nf4, none+nf4, ...


def experiments(args: argparse.Namespace, clients: int) -> list[Experiment]:
    """Every method in both settings (fedit and centralized with equal ranks only)."""
    if len(args.mixed) != clients:
        raise SystemExit(f"--mixed-ranks gives {len(args.mixed)} ranks for {clients} clients")
    equal = (args.equal_rank,) * clients
    plan = []
    for setting, ranks in (("equal", equal), ("mixed", args.mixed)):
        if setting not in args.settings:
            continue
        for method in [*args.methods, *([CENTRALIZED] if args.centralized else [])]:
            if setting == "mixed" and method in ("fedit", CENTRALIZED):
                continue
            if setting == "equal" and method == "zeropad":
                continue  # with equal ranks nothing is padded: zeropad is fedit, round for round
            label = f"{method}-{setting}"
            rounds = args.long_rounds if label in args.long_runs else args.rounds
            plan.append(Experiment(label, method, ranks, rounds))
            if method != CENTRALIZED:
                plan += [Experiment(f"{method}@{d}-{setting}", method, ranks, rounds, d) for d in args.downlinks]
                plan += [Experiment(f"{method}:{b}-{setting}", method, ranks, rounds, bases=b) for b in args.bases]
    return plan


def parse_args() -> argparse.Namespace:
    """Defaults sized to about 40 CPU-minutes on this machine; --smoke shrinks everything for CI."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="aggregation methods (centralized is added)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-rounds", type=int, default=10)
    parser.add_argument("--long-runs", default="fedex-equal,fedit-equal,flora-warm-mixed,fedex-mixed,zeropad-mixed",
                        help="runs (method-setting) that go on to --long-rounds ('' for none)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--centralized", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the centralized reference (--no-centralized: when an earlier run has it)")
    parser.add_argument("--local-steps", type=int, default=10, help="optimiser steps per client and round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--cutoff", type=int, default=128, help="tokens per example")
    parser.add_argument("--examples-per-client", type=int, default=100, help="subsample of each client's file")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="of each client's subsample")
    parser.add_argument("--settings", default="equal,mixed", help="which of the two settings to run (%(default)s)")
    parser.add_argument("--equal-rank", type=int, default=4)
    parser.add_argument("--mixed-ranks", default="16,8,4,4,2,2,1,1,1,1")
    parser.add_argument("--mmlu-questions", type=int, default=100, help="spread over the 1444 (0: skip MMLU)")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel, one torch thread each")
    parser.add_argument("--seed", type=int, default=0, help="first seed; also the data split")
    parser.add_argument("--first-seed", type=int, default=None,
                        help="first run seed when it differs from --seed: more seeds on the same data split "
                             "(--seed 0 --first-seed 3 --seeds 2 adds seeds 3, 4 to a 3-seed run)")
    parser.add_argument("--downlinks", default="", help="compressed downlinks to run every method with too, e.g. e0.99,e0.95,r4+bfloat16")
    parser.add_argument("--bases", default="", help="client bases to run every method with too, each cycled over "
                        "the clients: nf4 (all 4-bit), none+nf4 (every other client), ... (flora-sim --quantize)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for quality.json and quality.png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the built-in model and data, for CI")
    parser.add_argument("--from-runs", type=Path, help="report the finished runs of a quality-runs.jsonl instead of running")
    args = parser.parse_args()
    try:
        args.mixed = parse_ranks(args.mixed_ranks)
        args.methods = parse_methods(args.methods)
        args.long_runs = {label.strip() for label in args.long_runs.split(",") if label.strip()}
        args.downlinks = [policy_label(parse_policy(d)) for d in args.downlinks.split(",") if d.strip()]
        args.bases = [b.strip() for b in args.bases.split(",") if b.strip()]
        args.settings = {s.strip() for s in args.settings.split(",") if s.strip()}
        if not args.settings or not args.settings <= {"equal", "mixed"}:
            raise ValueError(f"--settings {','.join(sorted(args.settings))!r}: give equal, mixed or both")
        for bases in args.bases:
            client_bases(bases.split("+"), 1)
    except ValueError as exc:
        parser.error(str(exc))
    if args.smoke:
        args.rounds, args.long_rounds, args.seeds, args.local_steps, args.batch_size = 1, 2, 2, 2, 4
        args.cutoff, args.examples_per_client, args.equal_rank, args.mixed = 48, 12, 2, (4, 2, 1)
        args.mmlu_questions, args.long_runs = 8, {"flora-warm-mixed"}
    return args


def load_material(args: argparse.Namespace, tmp: Path) -> tuple[str, str, Federation, list[Question]]:
    """Base model name, data description, the federation and the MMLU questions (../shared, else built-in)."""
    use_shared = not args.smoke and SHARED_MODEL.is_dir() and SHARED_DATA.is_dir()
    base_model = str(SHARED_MODEL) if use_shared else BUILTIN_MODEL
    tokenizer = load_tokenizer(base_model)
    options = DataOptions("alpaca", args.cutoff, False, args.examples_per_client, args.validation_fraction, args.seed)
    if use_shared:
        files, data = client_files(SHARED_DATA), str(SHARED_DATA)
    else:
        clients = len(args.mixed) if args.smoke else GENERATED_CLIENTS
        files, data = sample_files(tmp, clients, args.examples_per_client, args.seed), "built-in sample data"
    questions = []
    if args.mmlu_questions and SHARED_MMLU.is_file():
        every = load_questions(SHARED_MMLU, tokenizer, MMLU_TOKENS)
        step = max(1, len(every) // args.mmlu_questions)
        questions = every[::step][: args.mmlu_questions]  # spread over the subjects, which the file groups
    return base_model, data, load_federation(files, tokenizer, options), questions


def _run_one(
    experiment: Experiment, seed: int, args: argparse.Namespace, base_model: str, federation: Federation, questions: list[Question]
) -> tuple[list[RoundRecord], float | None]:
    """One experiment and seed from a fresh copy of the base: its history and final MMLU accuracy."""
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    local = TrainConfig(max_steps=args.local_steps, batch_size=args.batch_size, learning_rate=args.learning_rate, device="cpu")
    bases = client_bases(experiment.bases.split("+"), len(experiment.ranks))
    config = SimConfig(experiment.method, experiment.ranks, experiment.rounds, local, seed=seed,
                       downlink=parse_policy(experiment.downlink), bases=bases)
    model = load_model(base_model)
    records = []
    for outcome in run_method(model, federation.clients, federation.validation, config):
        records.append(outcome.record)
        print(f"{experiment.label:<17} seed {seed} round {outcome.record.round}: validation loss "
              f"{outcome.record.validation_loss:.4f} ({outcome.record.seconds:.1f} s)", flush=True)
    return records, (accuracy(model, questions) if questions else None)


def run(args, base_model: str, federation: Federation, questions: list[Question], plan: list[Experiment]):
    """Every experiment and seed, --workers at a time; returns {label: records} and {label: [accuracy per seed]}."""
    first = args.seed if args.first_seed is None else args.first_seed
    seeds = range(first, first + args.seeds)
    jobs = [(e, s) for s in seeds for e in plan]  # seed-major: an interrupted run has whole seeds
    runs: dict[str, list[RoundRecord]] = {e.label: [] for e in plan}
    mmlu: dict[str, list[float]] = {e.label: [] for e in plan}
    args.out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool, open(args.out / "quality-runs.jsonl", "w") as log:
        futures = {pool.submit(_run_one, e, s, args, base_model, federation, questions): e for e, s in jobs}
        for future in as_completed(futures):  # each finished run is on disk at once
            experiment, (records, acc) = futures[future], future.result()
            runs[experiment.label] += records
            if acc is not None:
                mmlu[experiment.label].append(acc)
            log.write(json.dumps({"label": experiment.label, "mmlu_accuracy": acc, "history": [r.to_json() for r in records]}) + "\n")
            log.flush()
    return runs, mmlu


def load_runs(path: Path) -> tuple[list[Experiment], dict[str, list[RoundRecord]], dict[str, list[float]]]:
    """Plan, histories and MMLU accuracies of the finished runs in a quality-runs.jsonl."""
    plan: dict[str, Experiment] = {}
    runs: dict[str, list[RoundRecord]] = {}
    mmlu: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        records = [RoundRecord(**r) for r in entry["history"]]
        label = entry["label"]
        rounds = max(r.round for r in records)
        known = plan.get(label)
        downlink = label.rsplit("-", 1)[0].partition("@")[2] or "exact"
        bases = label.rsplit("-", 1)[0].partition(":")[2] or "none"
        plan[label] = Experiment(label, records[0].method, tuple(records[-1].ranks), max(rounds, known.rounds if known else 0),
                                 downlink, bases)
        runs.setdefault(label, []).extend(records)
        if entry["mmlu_accuracy"] is not None:
            mmlu.setdefault(label, []).append(entry["mmlu_accuracy"])
    return list(plan.values()), runs, mmlu


def report(args, base_model: str, data: str, federation: Federation, plan, runs, mmlu, base_mmlu, questions: int, wall, cpu) -> None:
    """Print the tables and write quality.json and a PNG per setting."""
    seeds = max(len({r.seed for r in records}) for records in runs.values())
    loss_rows, columns = by_round(runs, "validation_loss")
    print(f"\nValidation loss by round (mean ± std over up to {seeds} seeds; round 0 = base model)")
    print(format_table(loss_rows, columns))
    print("\nAggregation error |delta - exact FedAvg of the clients' models|_F / |exact|_F by round (mean)")
    print(format_table(format_errors(runs), columns))
    rows = summary_rows(plan, runs, mmlu, [args.rounds, args.long_rounds])
    print(f"\nSummary (loss: mean ± std over seeds; MMLU on {questions} questions after the last round, mean over seeds; base {base_mmlu})")
    print(format_table(rows, list(rows[0])))
    pairs = comparisons(runs, [args.rounds, args.long_rounds])
    print("\nPaired differences (same seeds): mean, std, and in how many seeds the first is lower")
    print(format_table(pairs, list(pairs[0])) if pairs else "(none)")
    compressed = downlink_comparisons(runs, [args.rounds, args.long_rounds])
    if compressed:
        print("\nCompressed downlink against exact (same method and seeds): loss difference, downlink share")
        print(format_table(compressed, list(compressed[0])))
    quantized = base_comparisons(runs, [args.rounds, args.long_rounds])
    if quantized:
        print("\nQuantized client bases against full precision (same method and seeds): loss difference, seed spread")
        print(format_table(quantized, list(quantized[0])))
    print(f"\nwall time {wall:.0f} s, CPU time {cpu / 60:.1f} min")
    payload = {
        "base_model": base_model,
        "data": data,
        "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()
                     if k not in ("out", "mixed_ranks", "from_runs")}
        | {"template": "alpaca", "mask_prompt": False},
        "federation": federation.summary(),
        "experiments": {
            e.label: {"method": e.method, "downlink": e.downlink, "ranks": list(e.ranks), "rounds": e.rounds,
                      "mmlu_accuracy": mmlu.get(e.label, []),
                      "history": [r.to_json() for r in runs[e.label]]}
            for e in plan
        },
        "mmlu": {"questions": questions, "base_accuracy": base_mmlu},
        "summary": rows,
        "paired": pairs,
        "downlink_paired": compressed,
        "bases_paired": quantized,
        "validation_loss_by_round": loss_rows,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "load_average_1_5_15_min_at_end": os.getloadavg(),  # > 2 on 2 cores: other work shared the CPU
    }
    path = write_results("quality", payload, args.out)
    for setting in ("equal", "mixed"):
        chosen = {label: records for label, records in runs.items() if label.endswith(f"-{setting}")}
        if not chosen:
            continue
        title = f"held-out loss, {setting} ranks: {Path(base_model).name}, {len(federation.clients)} clients, {seeds} seeds"
        plot_validation_loss(chosen, path.with_name(f"quality-{setting}.png"), title, first_round=1)
    print(f"wrote {path} and {path.with_name('quality-equal.png')}, {path.with_name('quality-mixed.png')}")


def main() -> None:
    """Run the plan (or read finished runs back with --from-runs), print and write the comparison."""
    args = parse_args()
    hf_logging.disable_progress_bar()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="flora-quality-") as tmp:
        base_model, data, federation, questions = load_material(args, Path(tmp))
    torch.set_num_threads(1)
    base_mmlu = accuracy(load_model(base_model), questions) if questions else None
    print(f"base model {base_model}, data {data}: {federation.summary()}; MMLU on {len(questions)} questions: base {base_mmlu}")
    if args.from_runs is not None:
        plan, runs, mmlu = load_runs(args.from_runs)
    else:
        plan = experiments(args, len(federation.clients))
        runs, mmlu = run(args, base_model, federation, questions, plan)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    report(args, base_model, data, federation, plan, runs, mmlu, base_mmlu, len(questions), wall, cpu)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


if __name__ == "__main__":
    main()
