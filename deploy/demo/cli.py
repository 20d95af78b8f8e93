"""flora-demo: a real federated run on this machine in one command.

Starts one ``flora-server`` and several ``flora-client`` processes of heterogeneous LoRA ranks
on loopback, shows their progress, and ends with a table per round, the path of the merged
checkpoint, and held-out prompts answered by the base model, each client's own model and the
merged one, scored per task. Everything is the production code path; only the processes share
one host.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import time
from pathlib import Path

from flora.common.methods import METHODS, get_method
from flora.common.basemodel import BUILTIN_MODEL
from flora.common.data import DATA_FORMATS, ReadOptions
from flora.common.quantize import QUANTIZATIONS, MissingExtra, bitsandbytes
from flora.common.secagg.plan import check_secure
from flora.common.settings import SettingsError, load_settings
from flora.common.tables import format_table
from flora.common.threads import threads_per_process
from flora.demo.completions import compare
from flora.demo.scoreboard import BASE, MERGED, RIGHT as RIGHT_MARK, accuracy_lines, completion_rows, score_table
from flora.demo.monitor import COLUMNS, StatusReader, read_history, round_rows
from flora.demo.processes import Child, Supervisor, wait_for_port
from flora.demo.sample_data import write_sample_data
from flora.server.admin.report import MATPLOTLIB_HINT, write_report
from flora.server.config import ENV_PREFIX, ServerSettings
from flora.demo.workspace import Workspace, builtin_data, folder_data, prepare

log = logging.getLogger("flora.demo")
# Tokens per example: room for an Alpaca prompt with input and its answer in the built-in model's
# bytes. Loss (training and validation) is on the answers only: the template is not the lesson.
CUTOFF = 320
# flora-server's differential-privacy settings, passed through as given (README, "Differential privacy").
DP_SETTINGS = ("dp_noise_multiplier", "dp_clip_norm", "dp_target_epsilon", "dp_delta", "dp_release", "dp_accountant")


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: expected comma-separated integers such as 16,8,4") from None
    if not ranks or any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: every rank must be >= 1")
    return ranks


def _quantizations(text: str) -> list[str]:
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    if not kinds or any(kind not in QUANTIZATIONS for kind in kinds):
        raise argparse.ArgumentTypeError(f"--quantize {text!r}: expected a comma-separated list of {', '.join(QUANTIZATIONS)}")
    return kinds


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flora-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=_positive, default=3, help="number of client processes (default: 3)")
    parser.add_argument("--rounds", type=_positive, default=3, help="federated rounds (default: 3)")
    parser.add_argument("--ranks", type=_ranks, default=[16, 8, 4], help="LoRA rank per client, cycled if shorter (default: 16,8,4)")
    parser.add_argument("--quantize", type=_quantizations, default=["none"], help="base per client, cycled if shorter: none, or a 4-bit (nf4, fp4) or 8-bit (int8) base, e.g. none,none,nf4 for a constrained third client (needs the qlora extra; default: none)")
    parser.add_argument("--nproc", type=_positive, default=1, help="training processes per client, data-parallel (gloo on the CPU), as flora-client --nproc; not with a quantized base (default: 1)")
    parser.add_argument("--method", choices=list(METHODS), default="flora-warm", help="aggregation method (default: flora-warm)")
    parser.add_argument("--secure-aggregation", action="store_true", help="the server learns only each round's sum (flora, flora-warm, flexlora, ffa; README, \"Secure aggregation\")")
    parser.add_argument("--base-model", default=BUILTIN_MODEL, help="Hub id, local directory or the built-in tiny model (default)")
    parser.add_argument("--data-dir", type=Path, help="folder with one data file per client: JSON, JSONL, CSV or parquet (default: built-in sample data)")
    # plain: instruction and input on their own lines, within what the built-in tiny model attends across.
    parser.add_argument("--template", default="plain", help="prompt template: chat (the tokenizer's own chat template), alpaca, plain or a format string (default: plain)")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="auto", help="record form of the data; auto: detected per file (default)")
    parser.add_argument("--field", action="append", default=[], metavar="FORM_KEY=YOUR_KEY", help="read a form's key from another column, e.g. instruction=question (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path("flora-demo-run"), help="where state, logs and results go (default: ./flora-demo-run)")
    parser.add_argument("--target-modules", default="all-linear", help="linear layers LoRA adapts, as flora-server's flag: all-linear (default) or suffixes such as q_proj,v_proj")
    parser.add_argument("--local-steps", type=_positive, default=50, help="optimiser steps per client per round (default: 50)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="clients' peak learning rate (default: 3e-3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default: 900)")
    parser.add_argument("--write-data", type=Path, metavar="DIR", help="only write the built-in sample data for --clients clients into DIR, then exit")
    for name in DP_SETTINGS:
        parser.add_argument(f"--{name.replace('_', '-')}", metavar="VALUE",
                            help=f"flora-server's {name}: {ServerSettings.model_fields[name].description}")
    args = parser.parse_args(argv)
    _check_dp(parser, args)
    ranks = [args.ranks[k % len(args.ranks)] for k in range(args.clients)]
    try:  # every demo client uses alpha = 2 r (scaling 2)
        get_method(args.method).validate(ranks, [2.0] * len(ranks))
    except ValueError as exc:
        parser.error(f"--method {args.method} with --ranks {','.join(map(str, ranks))}: {exc}")
    if args.secure_aggregation:
        try:
            check_secure(get_method(args.method))
        except ValueError as exc:
            parser.error(f"--secure-aggregation with --method {args.method}: {exc}")
    args.client_ranks = ranks
    args.client_quantize = [args.quantize[k % len(args.quantize)] for k in range(args.clients)]
    if args.nproc > 1 and any(kind != "none" for kind in args.client_quantize):
        parser.error(f"--nproc {args.nproc} with --quantize {','.join(args.quantize)}: a quantized base trains in one "
                     "process (flora-client refuses --nproc with --quantize)")
    if any(kind != "none" for kind in args.client_quantize):
        try:
            bitsandbytes()
        except MissingExtra as exc:
            parser.error(str(exc))
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    return args


def client_names(count: int) -> list[str]:
    """The demo's client names, in the order of --ranks and --quantize."""
    return [f"client-{k}" for k in range(count)]


def _dp_values(args: argparse.Namespace) -> dict[str, str]:
    return {name: getattr(args, name) for name in DP_SETTINGS if getattr(args, name) is not None}


def _check_dp(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The DP flags as the server will judge them (with this demo's method, clients and rounds), before any process starts."""
    if not (values := _dp_values(args)):
        return
    run = {"method": args.method, "min_clients": str(args.clients), "rounds": str(args.rounds)}
    try:
        load_settings(ServerSettings, env_prefix=ENV_PREFIX, flags={**run, **values}, environ={})
    except SettingsError as exc:
        parser.error(str(exc))


def _server_args(args: argparse.Namespace, workspace: Workspace, validation: list[Path], ranks: list[int]) -> list[str]:
    flags = [
        "--host=127.0.0.1", "--port=0", f"--state-dir={workspace.server_state}", f"--base-model={args.base_model}",
        f"--rounds={args.rounds}", f"--min-clients={args.clients}", f"--method={args.method}",
        f"--validation-data={','.join(map(str, validation))}", f"--local-steps={args.local_steps}",
        f"--learning-rate={args.learning_rate}", f"--target-modules={args.target_modules}", f"--validation-cutoff={CUTOFF}", "--validation-mask-prompt",
        "--checkpoint-every=0", "--long-poll-s=2", "--client-timeout-s=60", "--round-deadline-s=600",
        # The global LoRA of the methods that keep one: the largest rank, alpha = 2 r like every client.
        f"--lora-rank={max(ranks)}", f"--lora-alpha={2 * max(ranks)}",
    ]
    if args.secure_aggregation:
        flags.append("--secure-aggregation")
    dp = [f"--{name.replace('_', '-')}={value}" for name, value in _dp_values(args).items()]
    return flags + dp + _data_flags(args, "--validation-")


def _data_flags(args: argparse.Namespace, prefix: str = "--") -> list[str]:
    """How the data is read, for the clients (``--template``...) or the server (``--validation-template``...)."""
    return [f"{prefix}template={args.template}", f"{prefix}data-format={args.data_format}",
            *(f"{prefix}field={spec}" for spec in args.field)]


def _client_args(port: int, name: str, rank: int, data: Path, workspace: Workspace, args: argparse.Namespace,
                 quantize: str = "none") -> list[str]:
    return [
        f"--server=127.0.0.1:{port}", f"--name={name}", f"--rank={rank}", f"--data={data}", f"--quantize={quantize}",
        f"--nproc={args.nproc}",
        f"--state-dir={workspace.client_state(name)}", f"--base-model={args.base_model}", "--progress=off",
        "--long-poll=2", "--backoff-max=2", f"--cutoff={CUTOFF}", "--mask-prompt", *_data_flags(args),
    ]


def _watch(reader: StatusReader, clients: list[Child], server: Child, timeout: float) -> None:
    """Print progress until every client has exited; fail fast if a process dies."""
    start = time.monotonic()
    while any(c.alive() for c in clients):
        if not server.alive():
            raise RuntimeError(f"the server exited with code {server.process.returncode}:\n{server.log_tail()}")
        failed = [c for c in clients if not c.alive() and c.process.returncode != 0]
        if failed:
            raise RuntimeError(f"{failed[0].name} exited with code {failed[0].process.returncode}:\n{failed[0].log_tail()}")
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the run did not finish within {timeout:.0f} s (see the logs in {server.log_path.parent})")
        status = reader.poll()
        if status is not None and (line := reader.changed_line(status)):
            print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True)
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    workspace = prepare(args.workdir)
    if args.data_dir is None:
        train_files, validation = builtin_data(workspace, args.clients)
    else:
        train_files, validation = folder_data(args.data_dir, workspace, args.clients)
    ranks = args.client_ranks
    names = client_names(args.clients)
    token = secrets.token_urlsafe(24)
    bases = ", ".join(f"{r}" + ("" if q == "none" else f" {q}") for r, q in zip(ranks, args.client_quantize))
    print(f"flora-demo: {args.clients} clients (ranks {bases}), {args.rounds} rounds, "
          f"method {args.method}, base model {args.base_model}\n  working directory: {workspace.root}", flush=True)
    with Supervisor(workspace.logs) as supervisor:
        server = supervisor.start("server", "flora.server.cli", _server_args(args, workspace, validation, ranks),
                                  env={"FLORA_OPERATOR_TOKEN": token})
        port = wait_for_port(server, timeout=120)
        print(f"  server listening on 127.0.0.1:{port} (log: {server.log_path})", flush=True)
        # All clients share this machine's cores: more threads than cores each would only thrash.
        threads = f"--threads={threads_per_process(args.clients * args.nproc)}"
        clients = [
            supervisor.start(name, "flora.client.cli", [*_client_args(port, name, rank, data, workspace, args, quantize), threads])
            for name, rank, data, quantize in zip(names, ranks, train_files, args.client_quantize)
        ]
        reader = StatusReader(port, token)
        try:
            _watch(reader, clients, server, args.timeout)
        finally:
            reader.close()
        supervisor.stop(server)
    return _report(workspace, args, validation)


def _report(workspace: Workspace, args: argparse.Namespace, validation: list[Path]) -> int:
    history = read_history(workspace.server_state / "history.jsonl")
    bases = dict(zip(client_names(args.clients), args.client_quantize))
    print("\n" + format_table(round_rows(history, bases), COLUMNS))
    losses = [r["validation_loss"] for r in history if r.get("validation_loss") is not None]
    if len(losses) >= 2:
        verdict = "lower" if losses[-1] < losses[0] else "NOT lower"
        print(f"\nvalidation loss of the merged model: {losses[0]:.4f} before round 1 -> {losses[-1]:.4f} after the last round ({verdict})")
    checkpoints = [workspace.server_state / r["checkpoint"] for r in history if r.get("checkpoint")]
    if checkpoints:
        print(f"merged checkpoint: {checkpoints[-1]}\n  load it with AutoModelForCausalLM.from_pretrained({str(checkpoints[-1])!r})")
        _show_completions(args, workspace, history[-1], checkpoints[-1], validation)
    if history and history[-1]["round"] > 0:
        _show_report(workspace)
    return 0 if history and history[-1]["round"] > 0 else 1


def _show_completions(args: argparse.Namespace, workspace: Workspace, last: dict, checkpoint: Path,
                      validation: list[Path]) -> None:
    """Held-out prompts answered by the base model, each client's own model and the merged one."""
    items, answers = compare(args.base_model, args.method, workspace.server_state, last, checkpoint, validation,
                             (BASE, MERGED), CUTOFF, ReadOptions(args.template, args.data_format, tuple(args.field)),
                             args.target_modules.split(","))
    print(f"\ngreedy completions of held-out prompts ({RIGHT_MARK}: exactly the expected answer):\n"
          + format_table(completion_rows(items, answers), ["task", "held-out prompt", "expected", BASE, MERGED]))
    print("\nexact answers per task (\"alone\": the client's own model after its last round):\n" + score_table(items, answers))
    print("\n" + "\n".join(accuracy_lines(items, answers)))


def _show_report(workspace: Workspace) -> None:
    """Write the run report (flora-admin report) and say where it is."""
    report = write_report(workspace.server_state, workspace.root, require_png=False)
    picture = f"{report.png} and " if report.png else ""
    print(f"\nrun report: {picture}{report.markdown}" + ("" if report.png else f" ({MATPLOTLIB_HINT})"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.write_data is not None:
        paths, validation = write_sample_data(args.write_data, args.clients)
        print(f"wrote {len(paths)} client files and {validation} into {args.write_data}")
        return
    # SIGTERM unwinds like Ctrl-C, so the supervisor stops every child on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(run(args))
    except KeyboardInterrupt:
        print("\nflora-demo: interrupted; all processes stopped", file=sys.stderr)
        sys.exit(130)
    except ValueError as err:  # --workdir or --data-dir unusable: a configuration error, as argparse's are
        print(f"flora-demo: {err}", file=sys.stderr)
        sys.exit(2)
    except (RuntimeError, TimeoutError) as err:  # the run itself failed
        print(f"flora-demo: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
