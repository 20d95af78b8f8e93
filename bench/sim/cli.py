"""``flora-sim``: K clients and the server's aggregation in one process, one method after another.

    flora-sim                                            # built-in model and data, ranks 16,8,4, flora-warm
    flora-sim --method flora,zeropad,centralized --ranks 64,32,16,16,8,8,4,4,4,4 --rounds 5
    flora-sim --base-model ../shared/models/stories260K --data-dir ../shared/data/dolly-10clients \\
        --ranks 8 --method flora,fedit --examples-per-client 200 --cutoff 192
    flora-sim --method flora-warm,fedex,zeropad --seeds 3          # mean and spread over 3 seeds
    flora-sim --backend ray --ray-address auto                     # a round's clients as Ray tasks
    flora-sim --downlink-energy 0.95 --downlink-dtype bfloat16     # a compressed downlink, as the server's
    flora-sim --quantize none,nf4                                  # every other client on a 4-bit base
    flora-sim --nproc 2                                            # each client's round on 2 processes (gloo)

Methods (flora.common.methods):
{methods}
  centralized: one LoRA of the largest rank on the union of the clients' data, as many steps
    per round as the round's clients together, merged each round (the reference).
Every client uses alpha = 2 * rank (scaling 2), so the averaging methods see one common scaling.
With --data-dir every .json/.jsonl/.csv/.parquet file there is one client, in natural order (client_2 before
client_10). --seeds N runs seeds --seed .. --seed+N-1 (the data split stays that of --seed, so
every seed is scored on the same validation set) and reports mean ± sample standard deviation.
--downlink-energy, --downlink-max-rank and --downlink-dtype send each round's delta as flora-server's
compressed downlink does (flora.sim.downlink): every model merges what is sent, the rest is carried.

Writes ``history.jsonl`` (a line per method, seed and round) and ``validation_loss.png`` (mean
line, band from lowest to highest seed) into --out and prints the loss and aggregation-error
tables. Exit status 2 for bad arguments or unreadable data.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from flora.client.trainer import TrainConfig
from flora.common.basemodel import BUILTIN_MODEL, load_model, load_tokenizer
from flora.common.data import DATA_FORMATS
from flora.common.devices import resolve_device
from flora.common.quantize import MissingExtra, bitsandbytes
from flora.common.weights import Weighting
from flora.common.methods import METHODS as AGGREGATION_METHODS
from flora.sim import downlink
from flora.sim.backends import BACKENDS, Backend, make_backend
from flora.sim.bases import FULL, client_bases
from flora.sim.engine import METHODS, RoundRecord, SimConfig, run_method
from flora.sim.federation import DataOptions, Federation, client_files, load_federation, sample_files
from flora.common.tables import format_table
from flora.common.threads import set_threads
from flora.sim.output import Runs, by_round, format_errors, plot_validation_loss, write_record

DEFAULT_LOCAL_STEPS = 10
DEFAULT_GENERATED_CLIENTS = 4  # with a single --ranks value and no --data-dir
GENERATED_PER_CLIENT = 120


def _method_lines() -> str:
    return "\n".join(f"  {m.name}: {m.summary}" for m in AGGREGATION_METHODS.values())


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option has a default that runs on the built-in model in seconds."""
    p = argparse.ArgumentParser(
        prog="flora-sim", description=__doc__.format(methods=_method_lines()), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-model", default=BUILTIN_MODEL, help="Hub id, local directory or the built-in name (%(default)s)")
    p.add_argument("--data-dir", type=Path, help="one data file per client: JSON, JSONL, CSV or parquet (default: generated sample data)")
    p.add_argument(
        "--clients", type=int,
        help=f"clients of generated data (default: one per rank, {DEFAULT_GENERATED_CLIENTS} for a single rank)",
    )
    p.add_argument(
        "--examples-per-client", type=int,
        help=f"subsample each client to this many examples (generated data: {GENERATED_PER_CLIENT})",
    )
    p.add_argument("--ranks", default="16,8,4", help="LoRA rank per client, comma-separated; one value: all clients (%(default)s)")
    p.add_argument("--method", default="flora-warm", help=f"comma-separated, each run in turn: {', '.join(METHODS)} (%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (%(default)s)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--local-steps", type=int, help=f"optimiser steps per client and round ({DEFAULT_LOCAL_STEPS} unless --local-epochs)")
    steps.add_argument("--local-epochs", type=int, help="passes over the local data per round instead of --local-steps")
    p.add_argument("--batch-size", type=int, default=8, help="examples per local step (%(default)s)")
    p.add_argument("--learning-rate", type=float, default=3e-3, help="peak local learning rate (%(default)s)")
    p.add_argument("--schedule", choices=["cosine", "constant", "run"], default="cosine",
                   help="its decay: cosine or constant each round, or one cosine over the whole run (%(default)s)")
    p.add_argument("--cutoff", type=int, default=256, help="tokens per example (%(default)s)")
    p.add_argument("--template", default="alpaca", help="prompt template: chat (the tokenizer's own), a name or a format string (%(default)s)")
    p.add_argument("--data-format", choices=DATA_FORMATS, default="auto", help="record form of the data files; auto: detected per file")
    p.add_argument("--field", action="append", default=[], metavar="FORM_KEY=YOUR_KEY",
                   help="read a form's key from another column, e.g. instruction=question (repeatable)")
    p.add_argument("--mask-prompt", action="store_true", help="no loss on prompt tokens (training and validation)")
    p.add_argument("--seed", type=int, default=0, help="seeds data splits, client selection and every LoRA (%(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="run this many seeds from --seed on; report mean and spread (%(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="local", help="where a round's clients train: in turn here, or as Ray tasks (%(default)s)")
    p.add_argument("--ray-address", help="with --backend ray: a cluster address (ray://host:10001, auto); default a local Ray")
    p.add_argument("--eval-file", type=Path, help="validation data (default: carved from the clients' data)")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="of each client's examples, without --eval-file (%(default)s)")
    p.add_argument("--weighting", choices=[Weighting.EXAMPLES.value, Weighting.UNIFORM.value], default=Weighting.EXAMPLES.value,
                   help="client weights p_k: by examples trained, or uniform (%(default)s)")
    p.add_argument("--clients-per-round", type=int, help="a seeded random subset per round (default: all)")
    downlink.add_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu (deterministic, the default), auto, cuda or cuda:N")
    p.add_argument("--quantize", default="none", help="base per client, cycled if shorter: none, or a 4-bit (nf4, fp4) "
                   "or 8-bit (int8) base as flora-client --quantize holds it, e.g. none,nf4 for half the clients "
                   "(needs the qlora extra; %(default)s)")
    p.add_argument("--nproc", type=int, default=1, help="training processes per client, data-parallel on the CPU "
                   "(gloo) as flora-client --nproc trains (%(default)s)")
    p.add_argument("--threads", type=int, help="torch threads of each training process (default: this host's usable "
                   "cores; with --backend ray one per task); 1 is fastest on a host others keep busy")
    p.add_argument("--out", type=Path, default=Path("flora-sim-out"), help="folder for history.jsonl and validation_loss.png (%(default)s)")
    return p


def parse_ranks(text: str) -> tuple[int, ...]:
    """``"16,8,4"`` -> (16, 8, 4); every entry a whole number >= 1."""
    ranks = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"--ranks {text!r}: {item!r} is not a whole number >= 1 (example: --ranks 16,8,4)")
        ranks.append(int(item))
    return tuple(ranks)


def parse_methods(text: str) -> list[str]:
    """``"flora,fedit"`` -> ["flora", "fedit"], each a known method, no repeats."""
    methods = [m.strip() for m in text.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise ValueError(f"--method {text!r}: give distinct methods among {', '.join(METHODS)}")
    return methods


def client_ranks(ranks: tuple[int, ...], clients: int | None, files: int | None) -> tuple[int, ...]:
    """One rank per client: ranks must match the data files (or --clients); a single value repeats."""
    if files is not None and clients is not None:
        raise ValueError("--clients applies to generated data; with --data-dir every file is one client")
    count = files if files is not None else clients
    if count is None:
        count = len(ranks) if len(ranks) > 1 else DEFAULT_GENERATED_CLIENTS
    if count < 1:
        raise ValueError(f"--clients must be >= 1, got {count}")
    if len(ranks) == 1:
        return ranks * count
    if len(ranks) != count:
        source = f"--data-dir has {count} client files" if files is not None else f"--clients is {count}"
        raise ValueError(f"--ranks gives {len(ranks)} ranks but {source}: give one rank per client, or a single rank")
    return ranks


def sim_configs(args: argparse.Namespace, ranks: tuple[int, ...]) -> list[SimConfig]:
    """One validated SimConfig per requested method, built before any work starts."""
    bases = client_bases([q.strip() for q in args.quantize.split(",")], len(ranks))
    if any(base != FULL for base in bases):
        bitsandbytes()  # MissingExtra, naming the install, before any work
        if args.nproc > 1 or args.backend != "local":
            raise ValueError("--quantize works with --backend local and --nproc 1 (as flora-client's: one training process)")
    local = TrainConfig(
        max_steps=args.local_steps or (0 if args.local_epochs else DEFAULT_LOCAL_STEPS),
        epochs=args.local_epochs or 1,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        schedule=args.schedule,
        device=args.device,
    )
    if not 1 <= args.seeds <= 100:
        raise ValueError(f"--seeds must be between 1 and 100, got {args.seeds}")
    return [
        SimConfig(method, ranks, args.rounds, local, Weighting(args.weighting), args.clients_per_round, seed,
                  downlink=downlink.policy_from_args(args), bases=bases)
        for method in parse_methods(args.method)
        for seed in range(args.seed, args.seed + args.seeds)
    ]


def load_data(args: argparse.Namespace, tokenizer, count: int) -> Federation:
    """The clients' files (or freshly generated sample data) read into a Federation."""
    options = DataOptions(
        args.template, args.cutoff, args.mask_prompt, args.examples_per_client, args.validation_fraction, args.seed,
        args.data_format, tuple(args.field),
    )
    if args.data_dir is not None:
        return load_federation(client_files(args.data_dir), tokenizer, options, args.eval_file)
    with tempfile.TemporaryDirectory(prefix="flora-sim-data-") as tmp:
        files = sample_files(Path(tmp), count, args.examples_per_client or GENERATED_PER_CLIENT, args.seed)
        return load_federation(files, tokenizer, options, args.eval_file)


def run_all(args: argparse.Namespace, federation: Federation, configs: list[SimConfig], backend: Backend) -> Runs:
    """Run every method and seed on a fresh copy of the base model, streaming history.jsonl as rounds finish."""
    runs: dict[str, list[RoundRecord]] = {}
    device = resolve_device(args.device)
    with open(args.out / "history.jsonl", "w") as history:
        for config in configs:
            model = load_model(args.base_model, device=device)
            records = runs.setdefault(config.method, [])
            for outcome in run_method(model, federation.clients, federation.validation, config, backend):
                record = outcome.record
                records.append(record)
                write_record(history, record)
                error = "-" if record.aggregation_error is None else f"{record.aggregation_error:.2e}"
                sent = "" if record.downlink is None else f"  downlink energy {record.downlink['retained_energy']:.4f}"
                print(f"{record.method:<11} seed {record.seed} round {record.round}: validation loss "
                      f"{record.validation_loss:.4f}  aggregation error {error}{sent}  ({record.seconds:.1f} s)", flush=True)
    return runs


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``flora-sim``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()
    try:
        files = len(client_files(args.data_dir)) if args.data_dir is not None else None
        ranks = client_ranks(parse_ranks(args.ranks), args.clients, files)
        configs = sim_configs(args, ranks)
        resolve_device(args.device)
        tokenizer = load_tokenizer(args.base_model)
        federation = load_data(args, tokenizer, len(ranks))
        backend = make_backend(args.backend, args.ray_address, args.threads, args.nproc)
        threads = set_threads(requested=args.threads)
    except (ValueError, OSError, MissingExtra) as exc:  # pydantic's ValidationError and DataFormatError are ValueErrors
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = federation.summary()
    bases = "" if all(base == FULL for base in configs[0].bases) else f", bases {list(configs[0].bases)}"
    print(f"{summary['clients']} clients (ranks {list(ranks)}{bases}), {sum(summary['train_examples'])} training and "
          f"{summary['validation_examples']} validation examples; fully masked: {summary['fully_masked_train_examples']}; "
          f"{threads} torch threads")
    runs = run_all(args, federation, configs, backend)
    plot_validation_loss(runs, args.out / "validation_loss.png", f"flora-sim: ranks {','.join(map(str, ranks))}")
    seeds = "" if args.seeds == 1 else f", mean ± std over {args.seeds} seeds"
    print(f"\nValidation loss of the global model by round (round 0 = base{seeds})")
    print(format_table(*by_round(runs, "validation_loss")))
    print("\nAggregation error |aggregate - sum p_k s_k B_k A_k|_F / |sum p_k s_k B_k A_k|_F")
    print(format_table(format_errors(runs), ["round", *runs]))
    print(f"\nwrote {args.out / 'history.jsonl'} and {args.out / 'validation_loss.png'}")
