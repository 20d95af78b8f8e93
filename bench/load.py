"""Load: N protocol-level clients against one real flora-server on loopback, N = 50..1000.

DESIGN.md section 8: 1,000 concurrent clients on one coordinator with 0 errors and no event-loop
stall (health check p99 under 100 ms). For each N a fresh ``flora-server`` (tiny built-in model,
every connected client selected, ``--rounds`` rounds) is driven by N ``bench.loadclients``
clients spread over a few worker processes; they make the daemon's calls with its deadlines and
"train" for ``--train-s`` seconds while heartbeating. Meanwhile this process asks the standard
gRPC health service every 20 ms (how a liveness probe sees the server: any stall of its event
loop shows as a slow answer) and samples the server's RSS and open file descriptors.

Printed per N: errors by call and status code; p50/p99 per call (NextTask is a long-poll: its
time includes the wait for the round; "TRAIN delivery" is the delay from a round's opening to
each client's TRAIN answer, the cost of waking every long-poll); health p99/max; RSS and fd
peaks; seconds per round (from the server's history.jsonl: commit to commit). The baseline in the
same run is the smallest N: the target is that the server's latencies do not grow with N.

    python -m bench.load                                # N = 50,200,500,1000, 2 rounds (~10 min)
    python -m bench.load --clients 1000 --profile out/  # with a py-spy profile of the server
    python -m bench.load --smoke                        # N = 6, 1 worker, 2 rounds (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from multiprocessing import Queue, get_context
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.loadclients import CALLS, Plan, run_worker
from bench.report import write_results
from flora.common.tables import format_table
from flora.demo.processes import Supervisor, wait_for_port

HEALTH_EVERY_S = 0.02
HEALTH_TIMEOUT_S = 10.0
SAMPLE_EVERY_S = 0.25
COLUMNS = ["clients", "errors", "health_p99_ms", "health_max_ms", "Join_p50_s", "Join_p99_s", "delivery_p50_s",
           "delivery_p99_s", "FetchGlobal_p50_s", "FetchGlobal_p99_s", "SubmitUpdate_p50_s", "SubmitUpdate_p99_s",
           "Heartbeat_p99_s", "Heartbeat_max_s", "round_s", "rss_max_MiB", "fds_max", "server_cpu_s", "clients_cpu_s"]


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Watch:
    """Health probe (every 20 ms) and server resource sampler (every 250 ms), in two threads."""

    def __init__(self, address: str, pid: int, until: float) -> None:
        self._address, self._process, self._until = address, psutil.Process(pid), until
        self._stop = threading.Event()
        self.health: list[float] = []
        self.health_at: list[float] = []  # time.time() each check started
        self.health_errors: Counter = Counter()
        self.rss: list[int] = []
        self.fds: list[int] = []
        self.cpu_s = 0.0  # the server's CPU seconds so far
        self._threads = [threading.Thread(target=self._probe, daemon=True), threading.Thread(target=self._sample, daemon=True)]

    def __enter__(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HEALTH_TIMEOUT_S + 1)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.time() < self._until

    def _probe(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while self._running():
                start, at = time.perf_counter(), time.time()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S)
                    self.health.append(time.perf_counter() - start)
                    self.health_at.append(at)
                except grpc.RpcError as err:
                    self.health_errors[err.code().name] += 1
                self._stop.wait(HEALTH_EVERY_S)

    def _sample(self) -> None:
        while self._running():
            with contextlib.suppress(psutil.Error):
                self.rss.append(self._process.memory_info().rss)
                self.fds.append(self._process.num_fds())
                times = self._process.cpu_times()
                self.cpu_s = times.user + times.system
            self._stop.wait(SAMPLE_EVERY_S)


@contextlib.contextmanager
def server(work: Path, clients: int, args: argparse.Namespace) -> Iterator[tuple[int, str]]:
    """A fresh flora-server for one N: (pid, address); stopped however the block ends."""
    flags = ["--port", "0", "--state-dir", str(work / "state"), "--min-clients", str(clients), "--rounds",
             str(args.rounds), "--clients-per-round", "all", "--long-poll-s", str(args.long_poll_s),
             "--round-deadline-s", str(args.round_deadline_s), "--client-timeout-s", "120", "--checkpoint-every", "0",
             "--merge-device", "cpu", "--max-rank", str(max(8, args.rank))]
    with Supervisor(work / "logs") as supervisor:
        child = supervisor.start("server", "flora.server.cli", flags, env={"HF_HUB_OFFLINE": "1"})
        yield child.process.pid, f"127.0.0.1:{wait_for_port(child, 300)}"


@contextlib.contextmanager
def profiled(pid: int, path: Path | None) -> Iterator[None]:
    """py-spy record of the server (every thread, idle or not, raw stacks) while the block runs, if asked.

    The event loop's thread outside ``select`` is the loop busy or blocked (SQLite's fsync holds no GIL).
    """
    if path is None or shutil.which("py-spy") is None:
        yield
        return
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "50", "--threads", "--idle",
                            "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def round_seconds(history: Path, started: float) -> list[float]:
    """Commit-to-commit seconds of each round (the first from when the clients started)."""
    if not history.exists():
        return []
    commits = [json.loads(line)["committed_unix"] for line in history.read_text().splitlines() if line.strip()]
    commits = [c for c in commits if c >= started]
    return [b - a for a, b in zip([started, *commits], commits)]


def _worker(plan: Plan, names: list[str], stagger_s: float, results: Queue) -> None:
    results.put(run_worker(plan, names, stagger_s))


def run_workers(plan: Plan, shares: list[list[str]], stagger_s: float, timeout_s: float) -> list[dict]:
    """One spawned process per share of the clients; their tallies, or an error after ``timeout_s``."""
    ctx = get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(plan, share, stagger_s, results), daemon=True) for share in shares]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + timeout_s
        return [results.get(timeout=max(1.0, deadline - time.monotonic())) for _ in workers]
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.terminate()
                worker.join(10)


def one_size(work: Path, clients: int, args: argparse.Namespace) -> dict:
    """Run N clients through the rounds against a fresh server; every measurement of that N."""
    budget = 60 + args.rounds * (args.train_s + args.long_poll_s) + clients * 0.4  # generous: slow is measured, not fatal
    with server(work, clients, args) as (pid, address):
        started = time.time()
        plan = Plan(address, args.rank, args.long_poll_s, args.train_s, args.heartbeat_s, args.round_deadline_s,
                    deadline=started + budget)
        names = [f"load-{i:05d}" for i in range(clients)]
        shares = [names[w::args.workers] for w in range(args.workers)]
        stagger = args.arrival_s / max(1, len(shares[0]))
        profile = (args.profile / f"server-{clients}.txt") if args.profile else None
        with Watch(address, pid, started + budget + 60) as watch, profiled(pid, profile):
            tallies = run_workers(plan, [s for s in shares if s], stagger, budget + 120)
        seconds = round_seconds(work / "state" / "history.jsonl", started)
    if args.profile:  # the server's log beside its profile: what it was doing at the slowest checks
        shutil.copy(work / "logs" / "server.log", args.profile / f"server-{clients}.log")
    return summarize(clients, tallies, watch, seconds, time.time() - started, started)


def summarize(clients: int, tallies: list[dict], watch: Watch, seconds: list[float], wall: float,
              started: float) -> dict:
    latencies = {c: [x for t in tallies for x in t["latencies"].get(c, [])] for c in CALLS}
    codes = Counter()
    for tally in tallies:
        for call, counts in tally["codes"].items():
            for code, count in counts.items():
                if code != "OK":
                    codes[f"{call}:{code}"] += count
    for code, count in watch.health_errors.items():
        codes[f"Health:{code}"] += count
    delivery = [x for t in tallies for x in t["delivery"]]
    row = {"clients": clients, "errors": sum(codes.values()), "errors_by_code": dict(codes), "started_unix": started,
           "finished": sum(t["finished"] for t in tallies), "wall_s": wall, "rounds_committed": len(seconds),
           "round_s": statistics.median(seconds) if seconds else None, "round_seconds": seconds,
           "health_p50_ms": _ms(percentile(watch.health, 0.5)), "health_p99_ms": _ms(percentile(watch.health, 0.99)),
           "health_max_ms": _ms(max(watch.health, default=None)), "health_checks": len(watch.health),
           "health_slowest": [(round(at - started, 2), round(s * 1000)) for s, at in
                              sorted(zip(watch.health, watch.health_at), reverse=True)[:10]],
           "health_max_ms_by_second": _by_second(watch.health, watch.health_at, started),
           "delivery_p50_s": percentile(delivery, 0.5), "delivery_p99_s": percentile(delivery, 0.99),
           "server_cpu_s": watch.cpu_s, "clients_cpu_s": sum(t["cpu_s"] for t in tallies),
           "rss_max_MiB": max(watch.rss, default=0) / (1 << 20), "fds_max": max(watch.fds, default=0)}
    for call in CALLS:
        row[f"{call}_count"] = len(latencies[call])
        row[f"{call}_p50_s"] = percentile(latencies[call], 0.5)
        row[f"{call}_p99_s"] = percentile(latencies[call], 0.99)
        row[f"{call}_max_s"] = max(latencies[call], default=None)
    return row


def _by_second(latencies: list[float], at: list[float], started: float) -> list[int]:
    """The slowest health check (ms) started in each second since ``started``: the stall timeline."""
    worst: dict[int, float] = {}
    for latency, when in zip(latencies, at):
        second = int(when - started)
        worst[second] = max(worst.get(second, 0.0), latency)
    return [round(worst.get(second, 0.0) * 1000) for second in range(max(worst, default=-1) + 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def plot(rows: list[dict], path: Path) -> None:
    """p99 latency of health and each call against N (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["clients"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ns, [(r["health_p99_ms"] or float("nan")) / 1000 for r in rows], marker="o", label="health check p99")
    for key, label in (("Join_p99_s", "Join p99"), ("delivery_p99_s", "TRAIN delivery p99"), ("FetchGlobal_p99_s",
                       "FetchGlobal p99"), ("SubmitUpdate_p99_s", "SubmitUpdate p99"), ("Heartbeat_p99_s", "Heartbeat p99")):
        ax.plot(ns, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o", label=label)
    ax.axhline(0.1, color="k", linestyle="--", linewidth=0.8, label="health target 100 ms")
    ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="flora-server under load")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="50,200,500,1000", help="comma-separated numbers of clients")
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per N")
    parser.add_argument("--rank", type=int, default=1, help="LoRA rank of every client's update")
    parser.add_argument("--train-s", type=float, default=10.0, help="seconds each client 'trains' per round")
    parser.add_argument("--heartbeat-s", type=float, default=5.0, help="seconds between heartbeats while training (the client's default)")
    parser.add_argument("--arrival-s", type=float, default=5.0, help="seconds over which the clients arrive")
    parser.add_argument("--long-poll-s", type=float, default=20.0, help="the server's long_poll_s")
    parser.add_argument("--round-deadline-s", type=float, default=600.0, help="the server's round_deadline_s")
    parser.add_argument("--profile", type=Path, default=None, help="folder for py-spy profiles of the server")
    parser.add_argument("--smoke", action="store_true", help="6 clients, 1 worker, 2 rounds (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.workers, args.train_s, args.heartbeat_s, args.arrival_s = "6", 1, 0.5, 0.2, 0.5
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops its server
    sizes = [int(n) for n in args.clients.split(",")]
    load = {"start": os.getloadavg()}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load['start'])} ({os.cpu_count()} CPUs)")
    rows = []
    for clients in sizes:
        with tempfile.TemporaryDirectory(prefix="flora-load-") as tmp:
            row = one_size(Path(tmp), clients, args)
        rows.append(row)
        print(f"  {clients} clients: {row['errors']} errors {row['errors_by_code'] or ''}, health p99 "
              f"{row['health_p99_ms']:.0f} ms, {row['rounds_committed']} rounds in {row['wall_s']:.0f} s", flush=True)
    load["end"] = os.getloadavg()
    print(format_table(rows, COLUMNS))
    print("delivery: round opened -> TRAIN received by a waiting long-poll. round_s: median commit-to-commit seconds\n"
          f"(includes the clients' {args.train_s:g} s of simulated training).")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load['end'])}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_results("load", {"settings": settings, "load_average": load, "rows": rows},
                         **({"out_dir": args.out} if args.out else {}))
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
