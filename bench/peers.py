"""Peers: the same LoRA-sized payloads through Flower's deployment runtime and through flora, in one run.

DESIGN.md section 8 ("at least as fast as Flower's own runtime moving the same payloads, in the
same run"). Flower is never a dependency of flora: the benchmark installs ``flwr==FLOWER_VERSION``
into its own virtual environment under ``$FLORA_CACHE/peers/`` (once; later runs reuse it), starts
a SuperLink and one SuperNode on loopback from it, and submits the Flower App in
``bench/flowerapp/`` with ``flwr run``. That app (it imports only flwr and numpy) moves each size
up (ClientApp reply to ServerApp) and down (ServerApp message to ClientApp), stamping wall-clock
times where the payload leaves and arrives; see its docstrings. Flower's runtime has a fixed cost
per message (a ClientApp process per message, HTTP polling), measured by 4-byte transfers in the
same run: the table gives MB/s both as measured and net of that fixed cost.

flora's side is ``bench.transport``'s own measurement (the real ``flora-server`` and a scripted
flora.v1 client: upload end to end until the server has validated and recorded the update;
download of the round's global update into a verified file), run in the same invocation.

Server memory: flora's server process is probed per transfer (``bench.loopback.ServerProbe``);
Flower's SuperLink (the process that holds every message) is sampled every 10 ms during its whole
run and its peak inside each transfer's window is taken, together with its children (SuperExec
and the ServerApp process).

    python -m bench.peers                 # 1, 16, 256 MiB x 3 repeats
    python -m bench.peers --quick         # 1 and 16 MiB, 1 repeat
    python -m bench.peers --sizes 1,64 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from flora.common.basemodel import cache_root
from flora.common.chunks import DEFAULT_CHUNK_SIZE
from flora.common.tables import format_table

FLOWER_VERSION = "1.42.0"
APP = Path(__file__).resolve().parent / "flowerapp"
MB = 1e6
SAMPLE_S = 0.01
RUN_TIMEOUT_S = 1800.0
COLUMNS = ["size_MiB", "system", "upload_MBps", "upload_net_MBps", "download_MB", "download_MBps", "download_net_MBps",
           "fixed_up_s", "fixed_down_s", "server_rss_MB", "server_growth_MB", "flora_over_flower_up"]


# --- Flower's own environment and runtime ------------------------------------------------------

def flower_env(root: Path | None = None) -> Path:
    """The ``bin`` folder of a virtual environment holding only ``flwr==FLOWER_VERSION`` (made once).

    Its own environment because Flower pins grpcio/protobuf versions of its own; the marker file
    is written last, so an interrupted install is redone rather than half-used.
    """
    venv = (root or cache_root() / "peers") / f"flwr-{FLOWER_VERSION}"
    marker = venv / ".installed"
    if not marker.exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"flwr=={FLOWER_VERSION}"], check=True)
        marker.write_text(FLOWER_VERSION + "\n")
    return venv / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RssSampler:
    """RSS of a process and of it with its children, every SAMPLE_S, as (wall time, own, tree) rows."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.rows: list[tuple[float, int, int]] = []

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            with contextlib.suppress(psutil.Error):
                own = self._process.memory_info().rss
                tree = own
                for child in self._process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        tree += child.memory_info().rss
                self.rows.append((time.time(), own, tree))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> dict[str, float]:
        """Peak (own and tree) inside [start, end] and growth of the own RSS over the sample before it."""
        inside = [r for r in self.rows if start <= r[0] <= end] or [min(self.rows, key=lambda r: abs(r[0] - end))]
        before = [r for r in self.rows if r[0] < start] or inside
        return {"peak": max(r[1] for r in inside), "tree_peak": max(r[2] for r in inside),
                "growth": max(r[1] for r in inside) - before[-1][1]}


@contextlib.contextmanager
def _started(command: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A Flower process in its own session, its output to ``log``; its process group ended however the block ends."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait()


def _wait_http(port: int, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on port {port} within 120 s")


@dataclass
class Runtime:
    """A started SuperLink and its SuperNodes: the environment ``flwr`` runs in, and the processes."""

    bin_dir: Path
    env: dict[str, str]
    work: Path
    link: subprocess.Popen
    nodes: list[subprocess.Popen]

    def run(self, app: Path, config: str, out: Path, timeout_s: float = RUN_TIMEOUT_S) -> dict:
        """Submit ``app`` with ``flwr run`` and wait for its ServerApp to write ``out`` (JSON); return it."""
        started = time.monotonic()
        subprocess.run([str(self.bin_dir / "flwr"), "run", str(app), "bench", "--run-config", config], env=self.env,
                       cwd=self.work, check=True, capture_output=True, timeout=120)
        while not out.exists():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the Flower run wrote no results within {timeout_s:.0f} s; logs in {self.work}")
            if any(p.poll() is not None for p in [self.link, *self.nodes]):
                raise RuntimeError("a Flower process exited during the run; see its log in " + str(self.work))
            time.sleep(0.5)
        time.sleep(0.2)  # the file is written in one call; let it close
        return json.loads(out.read_text())


@contextlib.contextmanager
def flower_runtime(work: Path, node_configs: list[str | None]) -> Iterator[Runtime]:
    """A SuperLink and one SuperNode per entry of ``node_configs`` (its ``--node-config``) on loopback."""
    bin_dir = flower_env()
    home = work / "flwr-home"
    home.mkdir(parents=True)
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("VIRTUAL_ENV", None)
    link_cmd = [str(bin_dir / "flower-superlink"), "--insecure", "--port", str(link_port),
                "--disable-runtime-dependency-installation"]
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(_started(link_cmd, work / "superlink.log", env))
        _wait_http(link_port, link, "flower-superlink", work / "superlink.log")
        nodes = []
        for i, node_config in enumerate(node_configs):
            port, log = free_port(), work / f"supernode-{i}.log"
            node_cmd = [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                        "--port", str(port), *(["--node-config", node_config] if node_config else [])]
            nodes.append(stack.enter_context(_started(node_cmd, log, env)))
            _wait_http(port, nodes[-1], "flower-supernode", log)
        yield Runtime(bin_dir, env, work, link, nodes)


def run_flower(work: Path, sizes: list[float], repeats: int) -> dict:
    """Start a SuperLink and a SuperNode on loopback, run the probe app; its samples with memory added."""
    out = work / "flower.json"
    config = f'sizes-mib="{",".join(f"{s:g}" for s in sizes)}" repeats={repeats} out="{out}"'
    work.mkdir(parents=True)
    with flower_runtime(work, [None]) as runtime, RssSampler(runtime.link.pid) as sampler:
        result = runtime.run(APP, config, out)
    for sample in result["samples"] + result["empty"]:
        sample["up_memory"] = sampler.window(*sample["up_window"])
        sample["down_memory"] = sampler.window(*sample["down_window"])
    return result


# --- the table ------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    return statistics.median(values)


def _net(size: float, seconds: float, fixed: float) -> float | None:
    """MB/s over the time beyond the fixed per-message cost (None where nothing is left)."""
    return size / (seconds - fixed) / MB if seconds > fixed else None


def flower_rows(result: dict) -> list[dict]:
    """One row per size: medians over the repeats; 'net' subtracts the 4-byte transfers' medians."""
    fixed_up = _median([s["up_s"] for s in result["empty"]])
    fixed_down = _median([s["down_s"] for s in result["empty"]])
    rows = []
    timed = [s for s in result["samples"] if not s["warmup"]]
    for size in dict.fromkeys(s["bytes"] for s in timed):
        group = [s for s in timed if s["bytes"] == size]
        up, down = _median([s["up_s"] for s in group]), _median([s["down_s"] for s in group])
        peak = max(max(s["up_memory"]["peak"], s["down_memory"]["peak"]) for s in group)
        growth = _median([max(s["up_memory"]["growth"], s["down_memory"]["growth"]) for s in group])
        rows.append({"size_MiB": size / (1 << 20), "system": f"Flower {FLOWER_VERSION}", "bytes": size,
                     "upload_MBps": size / up / MB, "upload_net_MBps": _net(size, up, fixed_up),
                     "download_MB": size / MB, "download_MBps": size / down / MB, "download_net_MBps": _net(size, down, fixed_down),
                     "fixed_up_s": fixed_up, "fixed_down_s": fixed_down, "server_rss_MB": peak / MB,
                     "server_growth_MB": growth / MB,
                     "server_tree_rss_MB": max(s["up_memory"]["tree_peak"] for s in group) / MB})
    return rows


def flora_rows(transport_rows: list[dict]) -> list[dict]:
    """bench.transport's rows (upload and download per size) as one row per size.

    flora's download is the round's global update (the downlink: never larger than the dense
    delta), not the uploaded payload, so its size is its own column.
    """
    rows = []
    for size in dict.fromkeys(r["size_MiB"] for r in transport_rows):
        up = next(r for r in transport_rows if r["size_MiB"] == size and r["direction"] == "upload")
        down = next(r for r in transport_rows if r["size_MiB"] == size and r["direction"] == "download")
        rows.append({"size_MiB": size, "system": "flora", "bytes": up["payload_bytes"],
                     "upload_MBps": up["grpc_MBps"], "download_MB": down["payload_bytes"] / MB,
                     "download_MBps": down["grpc_MBps"],
                     "server_rss_MB": max(up["rss_peak_MB"], down["rss_peak_MB"]),
                     "server_growth_MB": max(up["rss_growth_MB"], down["rss_growth_MB"]),
                     "raw_socket_MBps": up["raw_MBps"]})
    return rows


def combine(flora: list[dict], flower: list[dict]) -> list[dict]:
    """Rows per size, flora then Flower, with flora's upload MB/s over Flower's (as measured) on flora's row."""
    rows = []
    for ours in flora:
        theirs = next((r for r in flower if abs(r["size_MiB"] - ours["size_MiB"]) < 1e-6), None)
        if theirs is not None:
            ours = {**ours, "flora_over_flower_up": ours["upload_MBps"] / theirs["upload_MBps"]}
        rows += [ours] + ([theirs] if theirs is not None else [])
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,256", help="comma-separated payload sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per size (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="1 and 16 MiB, 1 repeat")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = "1,16", 1
    return args


def main() -> None:
    from bench import transport  # imported here: it imports torch, which the helpers above never need
    from bench.report import write_results

    args = parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    load = {"start": os.getloadavg()}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load['start'])} ({os.cpu_count()} CPUs)", flush=True)
    with tempfile.TemporaryDirectory(prefix="flora-peers-") as tmp:
        work = Path(tmp)
        (work / "flora").mkdir()
        # bench.transport's random factors exceed the server's default norm bound above a few MiB;
        # the norm check stays on, only its bound is lifted (the variable reaches the server process).
        os.environ.setdefault("FLORA_MAX_UPDATE_NORM", "1e12")
        samples = list(transport.run(work / "flora", sizes, args.repeats, DEFAULT_CHUNK_SIZE))
        flora = flora_rows(transport.summarize([s for s in samples if not s["warmup"]]))
        print("flora done; Flower next", flush=True)
        flower_result = run_flower(work / "flower", sizes, args.repeats)
    flower = flower_rows(flower_result)
    rows = combine(flora, flower)
    load["end"] = os.getloadavg()
    print(format_table(rows, COLUMNS))
    print("MB = 1e6 bytes. upload: client to server until the server holds it (flora: validated and recorded);\n"
          "download: server to client (flora: the round's global update, download_MB). net: beyond Flower's fixed cost per message (its 4-byte transfers).\n"
          "server_rss_MB: flora-server / Flower SuperLink peak during the transfers.")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load['end'])}")
    settings = {"sizes_MiB": sizes, "repeats": args.repeats, "flower": FLOWER_VERSION, "cpus": os.cpu_count()}
    path = write_results("peers", {"settings": settings, "load_average": load, "rows": rows,
                                   "flora_samples": samples, "flower": flower_result},
                         **({"out_dir": args.out} if args.out else {}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
