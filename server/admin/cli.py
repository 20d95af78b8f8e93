"""``flora-admin``: provision a project, watch and steer a running server, report on a run.

    flora-admin provision --project NAME --server HOST[,ALT...] --clients a,b,c --out DIR
    flora-admin provision --out DIR --add-client d
    flora-admin status --config DIR/operator/operator.toml [--watch | --json]
    flora-admin clients --config DIR/operator/operator.toml list | remove NAME | readmit NAME
    flora-admin settings --config DIR/operator/operator.toml [--set min_clients=2 ...]
    flora-admin health --config DIR/operator/operator.toml
    flora-admin report STATE_DIR
    flora-admin dp-plan --clients N --rounds R (--noise-multiplier S | --target-epsilon E)

Exit status: 0 done, 1 the server could not be reached or refused, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc

from flora.common.privacy.accountant import PrivacyError
from flora.common.settings import SettingsError, add_settings_arguments, load_settings
from flora.common.tables import format_table
from flora.server.admin import console, dp_plan
from flora.server.admin.connect import ENV_PREFIX, OperatorSettings, metadata, operator_stub
from flora.server.admin.provision import Project, ProvisionError, add_clients, provision
from flora.server.admin.report import ReportError, write_report
from flora.server.registry import RegistryError
from flora.v1 import coordinator_pb2 as pb

EXIT_OK, EXIT_UNREACHABLE, EXIT_INPUT = 0, 1, 2


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name.strip(), value.strip()


def _operator_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text,
                            epilog=f"Every connection flag can also be {ENV_PREFIX}<FLAG> or a key of --config (operator.toml).")
    parser.add_argument("--config", type=Path, help="operator.toml from the operator kit (TOML or YAML)")
    add_settings_arguments(parser, OperatorSettings)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Sub-commands provision, status, clients, settings, health, report and dp-plan."""
    parser = argparse.ArgumentParser(prog="flora-admin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prov = sub.add_parser("provision", help="make startup kits (CA, certificates, tokens, configs)",
                          description="Make a project's startup kits, or add client kits to one (--add-client).")
    prov.add_argument("--out", type=Path, required=True, help="project folder to write (or extend)")
    prov.add_argument("--project", help="project name (new projects)")
    prov.add_argument("--server", type=_names, help="host names/addresses clients dial, comma-separated; the first goes into client.toml")
    prov.add_argument("--clients", type=_names, help="data holders' names, comma-separated (new projects)")
    prov.add_argument("--add-client", type=_names, metavar="NAMES", help="add these clients to the existing project in --out")
    prov.add_argument("--port", type=int, default=50051, help="the server's port (default: 50051)")
    prov.add_argument("--install-dir", default="", help="where each kit folder will sit on its host, e.g. /etc/flora "
                      "(paths in the configs; default: where it is written)")
    prov.add_argument("--days", type=int, default=365, help="certificate validity in days (default: 365)")
    prov.add_argument("--force", action="store_true", help="replace existing keys and tokens")
    status = _operator_parser(sub, "status", "show the run: round, deadline, clients, recent rounds")
    status.add_argument("--json", action="store_true", help="print the server's Status reply as JSON")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch (default: 2)")
    clients = _operator_parser(sub, "clients", "list the clients, remove one (its token and certificate stop working, "
                               "in later runs too) or re-admit a removed one")
    clients.add_argument("action", choices=["list", "remove", "readmit"], help="list, remove NAME or readmit NAME")
    clients.add_argument("name", nargs="?", help="the client to remove or re-admit")
    clients.add_argument("--reason", default="", help="why (kept in the server's log)")
    clients.add_argument("--json", action="store_true", help="print the server's reply as JSON")
    settings = _operator_parser(sub, "settings", "show the round settings of a running server, or change them (--set)")
    settings.add_argument("--set", dest="changes", action="append", type=_assignment, default=[], metavar="NAME=VALUE",
                          help="change a round setting: rounds, min_clients, clients_per_round, quorum or round_deadline_s "
                               "(repeatable; kept across restarts)")
    settings.add_argument("--json", action="store_true", help="print the server's reply as JSON")
    _operator_parser(sub, "health", "exit 0 when the server's gRPC health service reports SERVING (container health checks)")
    report = sub.add_parser("report", help="write report.png and report.md from a state directory",
                            description="Plot a run's losses, bytes and participants per round and summarise it in markdown.")
    report.add_argument("state_dir", type=Path, help="the server's state directory (holds history.jsonl)")
    report.add_argument("--out", type=Path, help="folder for report.png and report.md (default: STATE_DIR)")
    plan = sub.add_parser("dp-plan", help="print the (epsilon, delta) a client-level DP run would spend, or the sigma a target needs",
                          description="Plan a client-level DP run: epsilon per round for a noise multiplier, "
                                      "or the noise multiplier for a target epsilon. Nothing runs.")
    dp_plan.add_arguments(plan)
    return parser


def _provision(args: argparse.Namespace) -> int:
    if args.add_client:
        written = add_clients(args.out, args.add_client, force=args.force)
    else:
        missing = [f for f in ("project", "server", "clients") if not getattr(args, f)]
        if missing:
            raise ProvisionError(f"a new project needs --{', --'.join(missing)} (or --add-client to extend one)")
        if not 1 <= args.port <= 65535:
            raise ProvisionError(f"--port {args.port} is outside 1..65535")
        if args.days < 1:
            raise ProvisionError(f"--days {args.days}: certificates must be valid for at least 1 day")
        project = Project(args.project, args.server, args.port, args.install_dir, args.days)
        written = provision(project, args.clients, args.out, force=args.force)
    kits = sorted({p.parent for p in written if p.parent != args.out})
    print(f"wrote {len(written)} files into {args.out}:")
    for kit in kits:
        print(f"  {kit}")
    print("hand each clients/<name>/ folder to its data holder; keep ca/ca-key.pem offline")
    return EXIT_OK


def _operator(args: argparse.Namespace) -> OperatorSettings:
    flags = {k: v for k, v in vars(args).items() if k in OperatorSettings.model_fields}
    return load_settings(OperatorSettings, config_file=args.config, env_prefix=ENV_PREFIX, flags=flags)


def _status(args: argparse.Namespace) -> int:
    settings = _operator(args)
    channel, stub = operator_stub(settings)
    try:
        def fetch() -> pb.StatusReply:
            return stub.Status(pb.StatusRequest(), metadata=metadata(settings), timeout=settings.timeout)

        if args.json:
            print(json.dumps(console.as_json(fetch()), indent=2))
        elif args.watch:
            console.watch(fetch, sys.stdout, args.interval, terminal=sys.stdout.isatty())
        elif sys.stdout.isatty():
            from rich.console import Console

            Console().print(console.render_rich(fetch(), time.time()))
        else:
            sys.stdout.write(console.render_plain(fetch(), time.time()))
    finally:
        channel.close()
    return EXIT_OK


def _clients(args: argparse.Namespace) -> int:
    settings = _operator(args)
    channel, stub = operator_stub(settings)
    try:
        if args.action in ("remove", "readmit"):
            if not args.name:
                raise ProvisionError(f"clients {args.action} needs the client's NAME")
            if args.action == "remove":
                reply = stub.RemoveClient(pb.RemoveClientRequest(client_name=args.name, reason=args.reason),
                                          metadata=metadata(settings), timeout=settings.timeout)
            else:
                reply = stub.ReadmitClient(pb.ReadmitClientRequest(client_name=args.name),
                                           metadata=metadata(settings), timeout=settings.timeout)
            print(json.dumps(console.as_json(reply), indent=2) if args.json else reply.message)
            return EXIT_OK
        reply = stub.ListClients(pb.ListClientsRequest(), metadata=metadata(settings), timeout=settings.timeout)
    finally:
        channel.close()
    if args.json:
        print(json.dumps(console.as_json(reply), indent=2))
        return EXIT_OK
    rows = [{"client": c.client_name, "id": c.client_id or "-", "state": c.state, "rank": c.rank or "-",
             "last seen": console.ago(c.last_seen_unix_ms, time.time()), "last round": c.last_submitted_round or "-",
             "device": c.device or "-"} for c in reply.clients]
    print(format_table(rows, ("client", "id", "state", "rank", "last seen", "last round", "device")))
    return EXIT_OK


def _settings(args: argparse.Namespace) -> int:
    settings = _operator(args)
    channel, stub = operator_stub(settings)
    try:
        reply = stub.Settings(pb.SettingsRequest(changes=dict(args.changes)), metadata=metadata(settings),
                              timeout=settings.timeout)
    finally:
        channel.close()
    if args.json:
        print(json.dumps(console.as_json(reply), indent=2))
        return EXIT_OK
    print(reply.message)
    print(format_table([{"setting": k, "value": v} for k, v in sorted(reply.settings.items())], ("setting", "value")))
    return EXIT_OK


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = _operator(args)
    channel, _ = operator_stub(settings)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=settings.timeout)
    finally:
        channel.close()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(name)
    return EXIT_OK if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_UNREACHABLE


def _report(args: argparse.Namespace) -> int:
    report = write_report(args.state_dir, args.out)
    print(f"wrote {report.png} and {report.markdown}")
    return EXIT_OK


def _dp_plan(args: argparse.Namespace) -> int:
    print("\n".join(dp_plan.run(args)))
    return EXIT_OK


COMMANDS = {"provision": _provision, "status": _status, "clients": _clients, "settings": _settings, "health": _health,
            "report": _report, "dp-plan": _dp_plan}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flora-admin`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ProvisionError, ReportError, RegistryError, SettingsError, PrivacyError) as err:
        print(f"flora-admin {args.command}: {err}", file=sys.stderr)
        return EXIT_INPUT
    except grpc.RpcError as err:
        print(f"flora-admin {args.command}: the server answered {err.code().name}: {err.details()}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
