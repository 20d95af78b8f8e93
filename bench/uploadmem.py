"""Upload memory: server RSS while many clients upload large updates at once, per allocator setting.

DESIGN.md section 8: memory for a transfer is bounded by a few chunks, not the payload. Here K
clients (default 50) upload a P MiB update each (default 32) at the same instant to one real
``flora-server``; the server's RSS is sampled every ~5 ms and its exact peak read from the kernel
(``bench.loopback.ServerProbe``). The same run is made with glibc's default allocator behaviour
(``FLORA_MALLOC_TUNING=off``) and with the server's own tuning (``server/allocator.py``), each with
grpc's own receive window (64 KiB, grown by its bandwidth-delay probe) and with a fixed one
(the server's default ``stream_window_bytes``), so the baseline is measured in the same run. Bound to compare with: K x a few chunks (1 MiB each) plus a
fixed amount; the bytes in flight are K x P.

    python -m bench.uploadmem                 # 50 clients x 32 MiB, four settings (a few minutes)
    python -m bench.uploadmem --smoke         # 3 clients x 2 MiB, two settings (under a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from bench.loopback import ServerProbe
from bench.report import write_results
from bench.transport import BenchClient, rank_for, write_update
from flora.common.chunks import DEFAULT_CHUNK_SIZE
from flora.common.tables import format_table
from flora.demo.processes import Supervisor, wait_for_port
from flora.v1 import run_pb2, transfer_pb2

MiB = 1 << 20
OFF = {"FLORA_MALLOC_TUNING": "off"}
GRPC_WINDOW = ["--stream-window-bytes", "0"]
SETTINGS = {  # allocator, receive window -> (server environment, server flags)
    ("glibc defaults", "grpc's own"): (OFF, GRPC_WINDOW),
    ("server tuning", "grpc's own"): ({}, GRPC_WINDOW),
    ("glibc defaults", "fixed 1 MiB (default)"): (OFF, []),
    ("server tuning", "fixed 1 MiB (default)"): ({}, []),
}
COLUMNS = ["allocator", "window", "clients", "payload_MiB", "in_flight_MiB", "rss_before_MiB", "rss_peak_MiB", "growth_MiB",
           "growth_per_client_MiB", "growth_per_client_chunks", "seconds"]


@contextlib.contextmanager
def server(work: Path, clients: int, mib: float, env: dict[str, str], extra: list[str]) -> Iterator[tuple[int, str]]:
    """A fresh server whose first round waits for every uploader and one holder."""
    flags = ["--port", "0", "--state-dir", str(work / "state"), "--min-clients", str(clients + 1), "--rounds", "2",
             "--max-rank", "65536", "--max-update-bytes", str(int(mib * MiB * 1.2) + MiB), "--long-poll-s", "1",
             "--checkpoint-every", "0", "--round-deadline-s", "3600", "--merge-device", "cpu",
             "--max-update-norm", "1e30", *extra]  # random factors of a large rank: not a norm a run would allow
    with Supervisor(work / "logs") as supervisor:
        child = supervisor.start("server", "flora.server.cli", flags, env={"HF_HUB_OFFLINE": "1", **env})
        yield child.process.pid, f"127.0.0.1:{wait_for_port(child, 300)}"


def measure(work: Path, clients: int, mib: float, env: dict[str, str], extra: list[str]) -> dict:
    """K simultaneous uploads of one P MiB update each; RSS before and at the peak."""
    with server(work, clients, mib, env, extra) as (pid, address):
        uploaders = [BenchClient(address, f"up-{i}", DEFAULT_CHUNK_SIZE) for i in range(clients)]
        holder = BenchClient(address, "holder", DEFAULT_CHUNK_SIZE)  # keeps the round open meanwhile
        try:
            shapes = {m.name: (m.out_features, m.in_features) for m in holder.spec.target_modules}
            rank = rank_for(mib, shapes)
            for client in uploaders:
                client.join(rank)
            holder.join(1)
            tasks = [client.wait_train() for client in uploaders]
            uploads = []
            for i in range(clients):  # one payload each: the server counts the same bytes once a round
                payload = work / f"payload-{i}.safetensors"
                size, sha = write_update(payload, shapes, rank, tasks[0].round, client=i)
                uploads.append((payload, transfer_pb2.UpdateHeader(
                    round=tasks[0].round, rank=rank, alpha=float(rank), scaling_rule=run_pb2.SCALING_RULE_STANDARD,
                    num_examples=1, total_bytes=size, sha256=sha, base_version=tasks[0].required_version)))
            barrier = threading.Barrier(clients)
            errors: list[BaseException] = []

            def upload(client: BenchClient, payload: Path, header: transfer_pb2.UpdateHeader) -> None:
                barrier.wait(60)
                try:
                    client.upload(payload, header)
                except BaseException as err:  # noqa: BLE001 - reported after the join
                    errors.append(err)

            threads = [threading.Thread(target=upload, args=(c, *u), daemon=True) for c, u in zip(uploaders, uploads)]
            with ServerProbe(pid) as probe:
                start = os.times().elapsed
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(600)
                seconds = os.times().elapsed - start
            if errors:
                raise RuntimeError(f"{len(errors)} uploads failed, the first: {errors[0]}")
        finally:
            for client in [*uploaders, holder]:
                client.channel.close()
    memory = probe.result()
    growth = memory["growth"] / MiB
    return {"clients": clients, "payload_MiB": size / MiB, "in_flight_MiB": clients * size / MiB,
            "rss_before_MiB": memory["rss_before"] / MiB, "rss_peak_MiB": memory["rss_peak"] / MiB, "growth_MiB": growth,
            "growth_per_client_MiB": growth / clients, "growth_per_client_chunks": growth / clients / (DEFAULT_CHUNK_SIZE / MiB),
            "anon_growth_MiB": memory["anon_growth"] / MiB, "peak_exact": memory["peak_exact"], "seconds": seconds}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="simultaneous uploads")
    parser.add_argument("--mib", type=float, default=32.0, help="MiB per upload")
    parser.add_argument("--smoke", action="store_true", help="3 clients x 2 MiB, the first and last setting only")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.mib = 3, 2.0
    return args


def main() -> None:
    args = parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    rows = []
    settings = list(SETTINGS.items())
    for (allocator, window), (env, extra) in [settings[0], settings[-1]] if args.smoke else settings:
        with tempfile.TemporaryDirectory(prefix="flora-uploadmem-") as tmp:
            rows.append({"allocator": allocator, "window": window, **measure(Path(tmp), args.clients, args.mib, env, extra)})
        print(f"  {allocator}, window {window}: RSS grew {rows[-1]['growth_MiB']:.0f} MiB in {rows[-1]['seconds']:.0f} s",
              flush=True)
    print(format_table(rows, COLUMNS))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    path = write_results("uploadmem", {"settings": {"clients": args.clients, "mib": args.mib}, "rows": rows},
                         **({"out_dir": args.out} if args.out else {}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
