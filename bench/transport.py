"""Transport: LoRA payloads through the real flora-server over loopback gRPC vs a raw TCP socket.

DESIGN.md section 8: upload and download at >= 0.35x a raw TCP socket moving the same bytes in the
same run; server memory bounded by a few chunks plus the payload being written to disk. The real
``flora-server`` (tiny built-in model) is driven by a scripted flora.v1 client, one round per
payload; per repeat, interleaved (MB = 1e6 bytes):

- raw (``bench.loopback.RawPeer``): the payload file ``sendall``ed in chunk-size pieces to a
  receiver *process* that writes them to a file in the same temp dir and fsyncs (the server's disk
  work), once before each direction (both pooled into raw_MBps); also into memory only, once.
- upload end to end: SubmitUpdate until the reply, sent once the server has written, hashed,
  fsynced, validated and recorded the update; transfer only: until the server's temporary upload
  file holds every byte (its size polled every ~1 ms).
- download: FetchGlobal of the round's global adapter (same rank, about the same size) into a
  verified file as the client does it (ArtifactReceiver: write, sha256, fsync, rename).

Every timed transfer follows an untimed raw one of the same bytes, then deleted (``prime``): on
VMs that give freed memory back to the host (virtio-balloon free page reporting), memory freed a
second or more earlier costs ~2 ms/MB to touch again, which would otherwise fall at random on the
first transfer after a pause (the residue of that noise is why raw is pooled and medians are used).
Server memory (``bench.loopback.ServerProbe``): RSS every ~5 ms (psutil), the kernel's exact peak
(VmHWM, reset per transfer) and the anonymous part (heap copies, unlike the pages of an mmapped
payload). A second client holds each round open until the upload's reply is in, so that
aggregation never overlaps a measurement.

    python -m bench.transport            # 1, 16, 256 MiB x 3 repeats (about a minute)
    python -m bench.transport --smoke    # 1 and 2 MiB, 1 repeat (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from bench.loopback import RawPeer, ServerProbe, file_tail
from bench.report import write_results
from flora.common.chunks import DEFAULT_CHUNK_SIZE
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.payload import PayloadMeta, write_adapter
from flora.common.tables import format_table
from flora.common.wire import SUBMIT_UPDATE, ArtifactReceiver, encoded_update_messages
from flora.demo.processes import Supervisor, wait_for_port
from flora.v1 import coordinator_pb2 as pb
from flora.v1 import coordinator_pb2_grpc, run_pb2, transfer_pb2

MiB = 1 << 20
MB = 1e6
MAX_SERVER_RANK = 65536  # the upper bound of ServerSettings.max_rank
TIMEOUT_S = 600.0
TARGET = 0.35
TAIL_BYTES = 64  # the payload's last bytes (random float32 values) mark its arrival in the server's file
COLUMNS = ["size_MiB", "direction", "payload_bytes", "grpc_MBps", "grpc_transfer_MBps", "raw_MBps", "ratio",
           "ratio_transfer", "raw_mem_MBps", "rss_growth_MB", "growth_per_payload", "anon_growth_MB"]
Shapes = dict[str, tuple[int, int]]
T = TypeVar("T")


def rank_for(mib: float, shapes: Shapes) -> int:
    """The rank whose float32 factors (r x d_in + d_out x r per module) total about ``mib`` MiB."""
    return max(1, round(mib * MiB / (4 * sum(d_out + d_in for d_out, d_in in shapes.values()))))


def write_update(path: Path, shapes: Shapes, rank: int, round_number: int, client: int = 0) -> tuple[int, str]:
    """A valid client update (alpha = rank: scaling 1), written as the real client writes it; each
    ``client`` number gets bytes of its own (a server counts one payload once a round)."""
    gen = torch.Generator().manual_seed(round_number + 1_000_003 * client)
    pairs = {n: LoraPair(torch.rand(rank, d_in, generator=gen) - 0.5, torch.rand(d_out, rank, generator=gen) - 0.5)
             for n, (d_out, d_in) in sorted(shapes.items())}
    meta = PayloadMeta("client_update", rank=rank, alpha=float(rank), scaling_rule="standard", round=round_number)
    return write_adapter(path, LoraAdapter(pairs, 1.0), meta)


@contextlib.contextmanager
def flora_server(work: Path, rounds: int, max_bytes: int, chunk_size: int) -> Iterator[tuple[int, str]]:
    """The real ``flora-server`` as a subprocess, stopped however the block ends: (pid, address).

    Plain stacking (``--method flora``): every upload is validated in full (names, shapes,
    finiteness, norm) against a fresh start. min_clients=2 so that a holder client keeps each
    round open while the upload is measured;
    one round more than the bench uses and no periodic checkpoints, so that the final-round
    export (which concatenates every global adapter) never runs during the measurements.
    """
    args = ["--port", "0", "--state-dir", str(work / "state"), "--min-clients", "2", "--rounds", str(rounds),
            "--max-rank", str(MAX_SERVER_RANK), "--max-update-bytes", str(max_bytes), "--chunk-size", str(chunk_size),
            "--long-poll-s", "1", "--checkpoint-every", "0", "--round-deadline-s", "3600", "--merge-device", "cpu",
            "--max-update-norm", "1e30",  # random factors of a large rank: not a norm a run would allow
            # Fresh starts: flora-warm's start is an SVD of the global LoRA per rank and round, which
            # at this bench's ranks (thousands on 64-wide modules, as no real LoRA) costs seconds and
            # measures the method, not the wire. It runs while the payload arrives either way.
            "--method", "flora"]
    with Supervisor(work / "logs") as supervisor:
        child = supervisor.start("server", "flora.server.cli", args, env={"HF_HUB_OFFLINE": "1"})
        yield child.process.pid, f"127.0.0.1:{wait_for_port(child, 300)}"


def _until(what: str, check: Callable[[], T | None]) -> T:
    """Poll ``check`` (it may long-poll itself) until it returns something, for at most TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while (result := check()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {TIMEOUT_S:.0f} s")
        time.sleep(0.02)
    return result


class BenchClient:
    """A scripted flora.v1 participant: only the calls the transfers need, over one channel."""

    def __init__(self, address: str, name: str, chunk_size: int) -> None:
        limit = 2 * chunk_size + MiB  # the server's own limit: a piece plus its framing
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.submit_encoded = self.channel.stream_unary(SUBMIT_UPDATE, request_serializer=None,
                                                        response_deserializer=pb.SubmitReply.FromString)
        self.name, self.chunk_size, self.token = name, chunk_size, ""
        self.spec = self.stub.GetRun(pb.GetRunRequest(), timeout=60).run

    def _auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def join(self, rank: int) -> None:
        """Join, or rejoin with a new rank: an upload's header must match the rank of the last Join.

        A client selected in the open round may not change its rank: ``measure`` rejoins only
        while the holder is away, so that no round is open.
        """
        caps = pb.Capabilities(rank=rank, alpha=float(rank), scaling_rule=run_pb2.SCALING_RULE_STANDARD,
                               device="cpu", num_examples=1, software_version="bench")
        request = pb.JoinRequest(client_name=self.name, capabilities=caps, base_model_hash=self.spec.base_model_hash)
        self.token = self.stub.Join(request, metadata=self._auth(), timeout=60).client_token

    def leave(self) -> None:
        self.stub.Leave(pb.LeaveRequest(reason="bench"), metadata=self._auth(), timeout=60)

    def wait_train(self) -> pb.TrainTask:
        def train() -> pb.TrainTask | None:
            task = self.stub.NextTask(pb.NextTaskRequest(max_wait_ms=1000), metadata=self._auth(), timeout=60)
            return task.train if task.WhichOneof("kind") == "train" else None

        return _until(f"a TRAIN task for {self.name}", train)

    def wait_version(self, version: int) -> None:
        def reached() -> bool | None:
            return self.stub.GetRun(pb.GetRunRequest(), metadata=self._auth(), timeout=60).global_version >= version or None

        _until(f"version {version}", reached)

    def upload(self, path: Path, header: transfer_pb2.UpdateHeader) -> tuple[float, float]:
        """SubmitUpdate streamed from the file, serialised as the real client does: (start, end) perf_counter."""
        start = time.perf_counter()
        reply = self.submit_encoded(encoded_update_messages(header, path, self.chunk_size), metadata=self._auth(),
                                    timeout=TIMEOUT_S)
        end = time.perf_counter()
        if not reply.accepted or reply.duplicate:
            raise RuntimeError(f"the upload of round {header.round} was not freshly accepted: {reply.message}")
        return start, end

    def download(self, version: int, folder: Path) -> tuple[float, int]:
        """FetchGlobal of one global adapter into a verified file: (seconds, bytes)."""
        request = pb.FetchGlobalRequest(kind=transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE,
                                        from_version=version - 1, to_version=version)
        start = time.perf_counter()
        with ArtifactReceiver(lambda _kind, v: folder / f"v{v}.safetensors", 1 << 40) as receiver:
            for chunk in self.stub.FetchGlobal(request, metadata=self._auth(), timeout=TIMEOUT_S):
                receiver.feed(chunk)
            (artifact,) = receiver.finish()
        seconds = time.perf_counter() - start
        size = artifact.path.stat().st_size
        artifact.path.unlink()
        return seconds, size


@dataclass
class Bench:
    """What one run drives: the server process, its two clients and the raw baseline."""

    work: Path
    pid: int
    client: BenchClient
    holder: BenchClient
    raw: RawPeer
    shapes: Shapes


def measure(bench: Bench, mib: float) -> dict:
    """One round of about ``mib`` MiB: raw, upload, (round closes), raw to memory, raw, download.

    ``raw.prime`` before each timed transfer: see the module docstring.
    """
    rank, raw, payload = rank_for(mib, bench.shapes), bench.raw, bench.work / "payload.safetensors"
    bench.client.join(rank)  # no round is open: the holder is away (below)
    bench.holder.join(1)  # two clients connected: the round opens
    task = bench.client.wait_train()
    size, sha = write_update(payload, bench.shapes, rank, task.round)
    header = transfer_pb2.UpdateHeader(
        round=task.round, rank=rank, alpha=float(rank), scaling_rule=run_pb2.SCALING_RULE_STANDARD, num_examples=1,
        total_bytes=size, sha256=sha, base_version=task.required_version)
    sample: dict = {"size_MiB": mib, "rank": rank, "round": task.round, "payload_bytes": size}
    raw.prime(payload)
    sample["raw_up_s"] = raw.send(payload, True)
    raw.prime(payload)
    with ServerProbe(bench.pid, bench.work / "state" / "tmp", file_tail(payload, TAIL_BYTES)) as probe:
        start, end = bench.client.upload(payload, header)
    received = None if probe.received_at is None else probe.received_at - start
    sample.update(up_s=end - start, up_transfer_s=received, up_memory=probe.result())
    bench.holder.leave()  # every other selected client has submitted: the round closes now
    bench.client.wait_version(task.round)
    sample["raw_mem_s"] = raw.send(payload, False)
    raw.prime(payload)
    sample["raw_down_s"] = raw.send(payload, True)
    raw.prime(payload)
    with ServerProbe(bench.pid) as probe:
        sample["down_s"], sample["global_bytes"] = bench.client.download(task.round, bench.work / "downloads")
    sample["down_memory"] = probe.result()
    payload.unlink()
    return sample


def run(work: Path, sizes: list[float], repeats: int, chunk_size: int) -> Iterator[dict]:
    """Every sample, sizes interleaved within each repeat, after one warm-up round (marked)."""
    plan = [sizes[0]] + [mib for _ in range(repeats) for mib in sizes]
    for folder in ("raw", "downloads"):
        (work / folder).mkdir()
    server = flora_server(work, len(plan) + 1, int(max(sizes) * MiB * 1.1) + MiB, chunk_size)
    with server as (pid, address), RawPeer(work / "raw", chunk_size) as raw:
        client, holder = BenchClient(address, "bench", chunk_size), BenchClient(address, "holder", chunk_size)
        try:
            shapes = {m.name: (m.out_features, m.in_features) for m in client.spec.target_modules}
            if (top := rank_for(max(sizes), shapes)) > MAX_SERVER_RANK:
                raise ValueError(f"{max(sizes):g} MiB needs rank {top}, above the server's limit {MAX_SERVER_RANK}")
            bench = Bench(work, pid, client, holder, raw, shapes)
            for index, mib in enumerate(plan):
                yield {**measure(bench, mib), "warmup": index == 0}
        finally:
            client.channel.close()
            holder.channel.close()


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _mbps(group: list[dict], size_key: str, time_key: str) -> float | None:
    """Median MB/s over the repeats (each repeat's own byte count over its own time)."""
    return _median([s[size_key] / s[time_key] / MB if s.get(time_key) else None for s in group])


def _row(group: list[dict], direction: str) -> dict:
    """Medians over repeats for one size and direction; ratios are gRPC MB/s over raw-to-disk MB/s."""
    up = direction == "upload"
    size_key, memory_key = ("payload_bytes", "up_memory") if up else ("global_bytes", "down_memory")
    grpc_mbps = _mbps(group, size_key, "up_s" if up else "down_s")
    transfer = _mbps(group, size_key, "up_transfer_s") if up else None
    # Raw to disk is the same operation before either direction: pool both for a steadier baseline.
    raw_mbps = _median([s["payload_bytes"] / s[key] / MB for s in group for key in ("raw_up_s", "raw_down_s")])
    size = int(_median([s[size_key] for s in group]))
    memory = {key: _median([s[memory_key][key] for s in group]) for key in ("rss_before", "rss_peak", "growth", "anon_growth")}
    post = _median([s["up_s"] - s["up_transfer_s"] for s in group if s["up_transfer_s"] is not None]) if up else None
    return {
        "size_MiB": group[0]["size_MiB"], "direction": direction, "rank": group[0]["rank"], "payload_bytes": size,
        "grpc_MBps": grpc_mbps, "grpc_transfer_MBps": transfer, "raw_MBps": raw_mbps, "ratio": grpc_mbps / raw_mbps,
        "ratio_transfer": None if transfer is None else transfer / raw_mbps,
        "raw_mem_MBps": _mbps(group, "payload_bytes", "raw_mem_s"), "upload_after_transfer_s": post,
        "rss_before_MB": memory["rss_before"] / MB, "rss_peak_MB": memory["rss_peak"] / MB,
        "rss_growth_MB": memory["growth"] / MB, "growth_per_payload": memory["growth"] / size,
        "anon_growth_MB": memory["anon_growth"] / MB, "meets_target": grpc_mbps / raw_mbps >= TARGET,
    }


def summarize(samples: list[dict]) -> list[dict]:
    """Table rows: per size, upload then download."""
    rows = []
    for mib in dict.fromkeys(s["size_MiB"] for s in samples):
        group = [s for s in samples if s["size_MiB"] == mib]
        rows += [_row(group, "upload"), _row(group, "download")]
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """MB/s against payload size: gRPC up (end to end, transfer only) and down vs the raw socket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ups = [r for r in rows if r["direction"] == "upload"]
    downs = [r for r in rows if r["direction"] == "download"]
    sizes = [r["size_MiB"] for r in ups]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, group, key in (("gRPC upload, end to end", ups, "grpc_MBps"), ("gRPC upload, transfer only", ups,
                              "grpc_transfer_MBps"), ("gRPC download (verified file)", downs, "grpc_MBps"),
                              ("raw TCP to disk", ups, "raw_MBps"), ("raw TCP to memory", ups, "raw_mem_MBps")):
        ax.plot(sizes, [float("nan") if r[key] is None else r[key] for r in group], marker="o", label=label)
    ax.plot(sizes, [TARGET * r["raw_MBps"] for r in ups], "k--", label=f"target: {TARGET} x raw to disk")
    ax.set(xscale="log", xlabel="payload (MiB)", ylabel="MB/s (1e6 bytes/s)", title="flora transport on loopback")
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,256", help="comma-separated payload sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per size (medians are reported)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes per chunk, on every path")
    parser.add_argument("--smoke", action="store_true", help="1 and 2 MiB, 1 repeat (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.repeats = "1,2", 1
    return args


def main() -> None:
    args = parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    load = {"start": os.getloadavg()}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load['start'])} ({os.cpu_count()} CPUs)")
    samples = []
    with tempfile.TemporaryDirectory(prefix="flora-transport-") as tmp:
        for s in run(Path(tmp), sizes, args.repeats, args.chunk_size):
            samples.append(s)
            print(f"  {'warm-up' if s['warmup'] else 'sample'} {s['size_MiB']:g} MiB (round {s['round']}): up {s['up_s']:.3f} s, "
                  f"down {s['down_s']:.3f} s, raw {s['raw_up_s']:.3f} s / {s['raw_down_s']:.3f} s", flush=True)
    rows = summarize([s for s in samples if not s["warmup"]])
    load["end"] = os.getloadavg()
    print(format_table(rows, COLUMNS))
    print("grpc_MBps: upload end to end (server fsync + validation + record included) / download into a verified file.\n"
          "grpc_transfer_MBps: upload until the server's temporary file holds every byte. ratio: over raw_MBps (to disk).")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load['end'])}")
    settings = {"sizes_MiB": sizes, "repeats": args.repeats, "chunk_size": args.chunk_size, "cpus": os.cpu_count(),
                "MB": "1e6 bytes", "target_ratio": TARGET}
    path = write_results("transport", {"settings": settings, "load_average": load, "rows": rows, "samples": samples},
                         **({"out_dir": args.out} if args.out else {}))
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
