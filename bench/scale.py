"""Scale: a Llama-architecture model at real sizes through the server's round and the client's trainer.

Issue 14 item 6. Models are built from a config (random weights, no download), written as
sharded bfloat16 safetensors with the built-in byte-level tokenizer, and then used exactly as a
real checkpoint would be. Per shape, each in a fresh process (so its memory is its own):

- server: the real ``Aggregator`` (what ``flora-server`` runs in a thread): load the model,
  write version 0, then one round of K client updates (random factors of rank r, written as the
  client writes them) with the final-round checkpoint export; the phases' seconds are the round
  history's own. Memory: RSS sampled every 20 ms, with each phase's peak found from the phase
  times, and the kernel's exact peak (VmHWM) over the round; compared with the process before
  the model (imports only) + the model's bytes + the round's update bytes.
- client: ``train_lora`` (client/trainer.py) for a few steps on packed synthetic text, with and
  without gradient checkpointing: tokens/s and the peak RSS over the training.

The table gives each measurement per shape and an extrapolation to the Llama-2-7B shape: a line
through the two largest shapes measured, in what each figure grows with (``SERVER_BASIS``), and the
client's tokens/s at the largest shape's FLOP rate.

    python -m bench.scale                       # 0.3b and 1b shapes (about 10 minutes, ~12 GiB peak)
    python -m bench.scale --shapes 1b --clients 4
    python -m bench.scale --smoke               # tiny shape, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.loopback import _status_bytes
from bench.report import write_results
from flora.common.tables import format_table

GiB = 1 << 30
SAMPLE_S = 0.02


@dataclass(frozen=True)
class Shape:
    """A Llama config's sizes (the rest: Llama defaults)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def params(self) -> int:
        """Parameter count (norm weights included; tied embeddings counted once)."""
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def target_elements(self) -> int:
        """d_out x d_in summed over the default targets (q_proj, v_proj): what merging and the error scale with."""
        head_dim = self.hidden // self.heads
        return self.layers * (self.hidden * self.hidden + self.kv_heads * head_dim * self.hidden)

    def factor_width(self) -> int:
        """(d_out + d_in) summed over the targets: a rank-r update holds r times this many numbers."""
        head_dim = self.hidden // self.heads
        return self.layers * (2 * self.hidden + self.kv_heads * head_dim + self.hidden)


SHAPES = {
    "tiny": Shape(128, 344, 2, 4, 2, 512, False),
    "0.3b": Shape(1024, 4096, 16, 16, 4, 128256, True),
    "1b": Shape(2048, 8192, 16, 32, 8, 128256, True),  # Llama-3.2-1B
    "7b": Shape(4096, 11008, 32, 32, 32, 32000, False),  # Llama-2-7B: extrapolated to, never built here
}


def write_model(shape: Shape, folder: Path) -> None:
    """A random (seeded) bfloat16 ``LlamaForCausalLM`` of ``shape`` and the byte-level tokenizer, as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flora.common.basemodel import build_tokenizer

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=shape.tied,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16 directly: the model's bytes once
    try:
        model = LlamaForCausalLM(config)  # transformers' own initialisation: normal(0, 0.02)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="1GB")
    build_tokenizer().save_pretrained(folder)


# --- measuring inside a child process -----------------------------------------------------------

class RssTrace:
    """This process's RSS every SAMPLE_S with its perf_counter time; ``peak(start, end)`` per window.

    Also the anonymous part (RSS less file-backed and shared pages, psutil's ``shared`` on Linux):
    mapped safetensors shards count in RSS while they are read, but the kernel can drop them.
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.rows: list[tuple[float, int, int]] = []

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.rows.append((time.perf_counter(), *rss_and_anonymous(self._process)))

    def __enter__(self) -> RssTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float, anonymous: bool = False) -> int:
        inside = [anon if anonymous else rss for t, rss, anon in self.rows if start <= t <= end]
        return max(inside) if inside else rss_and_anonymous(self._process)[anonymous]


def rss_and_anonymous(process: psutil.Process) -> tuple[int, int]:
    info = process.memory_info()
    return info.rss, info.rss - getattr(info, "shared", 0)


def reset_peak() -> None:
    """Restart the kernel's high-water mark (VmHWM) from now (Linux >= 4.0; a no-op elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def server_round(model_dir: str, work: str, clients: int, rank: int) -> dict[str, Any]:
    """Child process: load, version 0, one round of ``clients`` updates with the checkpoint export."""
    from bench.transport import write_update
    from flora.server.aggregator import Aggregator
    from flora.server.config import ServerSettings
    from flora.server.layout import Layout
    from flora.server.store import Submission
    from flora.v1 import run_pb2

    settings = ServerSettings(base_model=model_dir, state_dir=Path(work) / "state", rounds=1, min_clients=clients,
                              merge_device="cpu", max_rank=max(rank, 1), max_update_bytes=1 << 40,
                              max_update_norm=1e12)
    layout = Layout(Path(work) / "state")
    layout.create()
    layout.tmp.mkdir(exist_ok=True)
    result: dict[str, Any] = {}
    result["rss_imports"], result["anonymous_imports"] = rss_and_anonymous(psutil.Process())
    with RssTrace() as trace:
        reset_peak()
        clock = time.perf_counter()
        aggregator = Aggregator(settings, layout)
        aggregator.initial()
        result["model_load_s"] = time.perf_counter() - clock
        result["model_load_peak"] = _status_bytes(os.getpid(), "VmHWM")
        result["model_load_anonymous_peak"] = trace.peak(clock, clock + result["model_load_s"], anonymous=True)
        result["rss_loaded"] = psutil.Process().memory_info().rss
        result["model_bytes"] = sum(p.numel() * p.element_size() for p in aggregator.model.parameters())
        submissions = []
        for k in range(clients):
            path = layout.update(1, f"c{k}", f"{k:064x}")
            path.parent.mkdir(parents=True, exist_ok=True)
            size, sha = write_update(path, aggregator.shapes, rank, k + 1)
            submissions.append(Submission(1, f"c{k}", sha, layout.relative(path), size, rank, float(rank),
                                          run_pb2.SCALING_RULE_STANDARD, 1, 0, None, None, 1, 0.0, 0.0))
        result["update_bytes"] = sum(s.size for s in submissions)
        reset_peak()
        start = time.perf_counter()
        output = aggregator.aggregate(1, submissions)
        end = time.perf_counter()
        result["round_peak"] = _status_bytes(os.getpid(), "VmHWM")
    result["round_s"] = end - start
    result["seconds"] = output.seconds
    offset = start
    for phase, seconds in output.seconds.items():  # the history's phases run one after another, in this order
        result[f"{phase}_peak"] = trace.peak(offset, offset + seconds)
        offset += seconds
    checkpoint = layout.absolute(output.checkpoint)
    result["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    return result


def client_steps(model_dir: str, steps: int, batch: int, seq_len: int, rank: int, checkpointing: bool) -> dict[str, Any]:
    """Child process: ``train_lora`` for ``steps`` steps on packed synthetic text; tokens/s and peak RSS."""
    from bench.train import packed_chunks, synthetic_examples
    from flora.client.trainer import TrainConfig, train_lora
    from flora.common.basemodel import load_model, load_tokenizer

    rss_imports = psutil.Process().memory_info().rss
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    rss_loaded = psutil.Process().memory_info().rss
    chunks = packed_chunks(synthetic_examples(steps * batch * 4), tokenizer, seq_len, steps * batch)
    config = TrainConfig(rank=rank, max_steps=steps, batch_size=batch, device="cpu", learning_rate=1e-4,
                         gradient_checkpointing=checkpointing)
    reset_peak()
    trained = train_lora(model, chunks[: steps * batch], config)
    return {"rss_imports": rss_imports, "rss_loaded": rss_loaded, "train_peak": _status_bytes(os.getpid(), "VmHWM"), "tokens": trained.tokens,
            "seconds": trained.seconds, "tokens_per_s": trained.tokens / trained.seconds,
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def _child_main(conn, fn_name: str, kwargs: dict) -> None:
    try:
        conn.send(("ok", globals()[fn_name](**kwargs)))
    except BaseException as error:  # the parent reports it; the child only exits
        conn.send(("error", f"{type(error).__name__}: {error}"))


def in_child(fn_name: str, **kwargs: Any) -> dict[str, Any]:
    """Run one of this module's measurement functions in a fresh spawned process; its result."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_child_main, args=(child, fn_name, kwargs))
    process.start()
    try:
        status, value = parent.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"{fn_name} died with exit code {process.exitcode} (out of memory?)") from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"{fn_name}: {value}")
    return value


# --- the table ------------------------------------------------------------------------------------

def server_row(name: str, shape: Shape, r: dict[str, Any]) -> dict[str, Any]:
    base = r["rss_imports"]
    allowed = r["model_bytes"] + r["update_bytes"]
    phases = {k[: -len("_peak")]: v for k, v in r.items() if k.endswith("_peak") and k[: -len("_peak")] in r["seconds"]}
    return {
        "shape": name, "params_M": shape.params() / 1e6, "model_GiB": r["model_bytes"] / GiB,
        "updates_MiB": r["update_bytes"] / (1 << 20), "model_load_s": r["model_load_s"], "round_s": r["round_s"],
        **{f"{phase}_s": s for phase, s in r["seconds"].items()},
        "model_load_peak_GiB": (r["model_load_peak"] - base) / GiB, "round_peak_GiB": (r["round_peak"] - base) / GiB,
        "model_load_anonymous_peak_GiB": (r["model_load_anonymous_peak"] - r["anonymous_imports"]) / GiB,
        **{f"{phase}_peak_GiB": (v - base) / GiB for phase, v in phases.items()},
        "model_plus_updates_GiB": allowed / GiB, "over_allowed_GiB": (r["round_peak"] - base - allowed) / GiB,
        "checkpoint_GiB": r["checkpoint_bytes"] / GiB,
    }


def client_row(name: str, shape: Shape, r: dict[str, Any], checkpointing: bool) -> dict[str, Any]:
    return {"shape": name, "params_M": shape.params() / 1e6, "gradient_checkpointing": checkpointing,
            "tokens_per_s": r["tokens_per_s"], "model_GiB": r["model_bytes"] / GiB,
            "loaded_GiB": (r["rss_loaded"] - r["rss_imports"]) / GiB,
            "train_peak_GiB": (r["train_peak"] - r["rss_imports"]) / GiB,
            "over_model_GiB": (r["train_peak"] - r["rss_imports"] - r["model_bytes"]) / GiB}


# What each server figure grows with: the whole model (memory, loading, export), the dense size of
# the target modules (aggregation error, factorization, merge), the factors' size (update bytes, reads).
SERVER_BASIS = {"params": ["model_GiB", "model_load_s", "checkpoint_s", "model_load_peak_GiB",
                           "model_load_anonymous_peak_GiB", "merge_peak_GiB",
                           "checkpoint_peak_GiB", "round_peak_GiB", "model_plus_updates_GiB", "over_allowed_GiB"],
                "target_elements": ["aggregate_s", "merge_s"],
                "factor_width": ["updates_MiB", "load_s", "factorize_s"]}
PHASES = ["load_s", "aggregate_s", "factorize_s", "merge_s", "checkpoint_s"]


def extrapolate(rows: list[dict[str, Any]], basis: dict[str, list[str]], shape: Shape, label: str) -> dict[str, Any]:
    """A row for ``shape`` from the line through the two largest measured shapes, per key in its basis.

    A slope below zero (noise on a figure that barely grows) is taken as zero: never below the largest measurement.
    """
    low, high = sorted(rows, key=lambda r: r["params_M"])[-2:]
    row: dict[str, Any] = {"shape": label, "params_M": shape.params() / 1e6}
    for measure, keys in basis.items():
        x_low, x_high = (getattr(SHAPES[r["shape"]], measure)() for r in (low, high))
        x = getattr(shape, measure)()
        for key in keys:
            if isinstance(low.get(key), (int, float)) and isinstance(high.get(key), (int, float)):
                row[key] = high[key] + max(0.0, (high[key] - low[key]) / (x_high - x_low)) * (x - x_high)
    return row


def seven_b_rows(server: list[dict[str, Any]], client: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The 7B estimates: server figures by their basis; client memory by parameters, and tokens/s
    at the largest shape's FLOP rate (training with a frozen base costs about 4 x params FLOPs a token)."""
    shape, label = SHAPES["7b"], "7b (extrapolated)"
    clients = []
    for checkpointing in (False, True):
        rows = [r for r in client if r["gradient_checkpointing"] is checkpointing]
        row = extrapolate(rows, {"params": ["model_GiB", "train_peak_GiB", "over_model_GiB"]}, shape, label)
        top = max(rows, key=lambda r: r["params_M"])
        clients.append({**row, "gradient_checkpointing": checkpointing,
                        "tokens_per_s": top["tokens_per_s"] * top["params_M"] / row["params_M"]})
    estimate = extrapolate(server, SERVER_BASIS, shape, label)
    return {**estimate, "round_s": sum(estimate[key] for key in PHASES)}, clients


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="0.3b,1b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--clients", type=int, default=4, help="updates in the measured round")
    parser.add_argument("--rank", type=int, default=16, help="rank of every update")
    parser.add_argument("--steps", type=int, default=3, help="client training steps")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="the tiny shape only, 2 clients, 2 steps (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.clients, args.steps, args.seq_len = "tiny", 2, 2, 32
    return args


SERVER_COLUMNS = ["shape", "params_M", "model_GiB", "updates_MiB", "model_load_s", "load_s", "aggregate_s", "factorize_s",
                  "merge_s", "checkpoint_s", "round_s", "model_load_peak_GiB", "model_load_anonymous_peak_GiB", "merge_peak_GiB", "checkpoint_peak_GiB", "round_peak_GiB",
                  "model_plus_updates_GiB", "over_allowed_GiB"]
CLIENT_COLUMNS = ["shape", "params_M", "gradient_checkpointing", "tokens_per_s", "model_GiB", "train_peak_GiB",
                  "over_model_GiB"]


def main() -> None:
    args = parse_args()
    names = args.shapes.split(",")
    load = {"start": os.getloadavg()}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load['start'])} ({os.cpu_count()} CPUs)", flush=True)
    server, client, raw = [], [], {}
    with tempfile.TemporaryDirectory(prefix="flora-scale-") as tmp:
        for name in names:
            shape, folder = SHAPES[name], Path(tmp) / name
            clock = time.perf_counter()
            in_child("write_model", shape=shape, folder=folder)
            print(f"{name}: built {shape.params() / 1e6:.0f} M parameters in {time.perf_counter() - clock:.0f} s", flush=True)
            raw[name] = {"server": in_child("server_round", model_dir=str(folder), work=str(Path(tmp) / f"{name}-server"),
                                            clients=args.clients, rank=args.rank)}
            server.append(server_row(name, shape, raw[name]["server"]))
            print(format_table(server[-1:], SERVER_COLUMNS), flush=True)
            for checkpointing in (False, True):
                result = in_child("client_steps", model_dir=str(folder), steps=args.steps, batch=args.batch_size,
                                  seq_len=args.seq_len, rank=args.rank, checkpointing=checkpointing)
                raw[name][f"client_gc{int(checkpointing)}"] = result
                client.append(client_row(name, shape, result, checkpointing))
                print(format_table(client[-1:], CLIENT_COLUMNS), flush=True)
            with contextlib.suppress(OSError):
                import shutil

                shutil.rmtree(folder)
    if len(server) >= 2:
        seven_server, seven_client = seven_b_rows(server, client)
        server, client = [*server, seven_server], [*client, *seven_client]
    load["end"] = os.getloadavg()
    print("\nserver (seconds; GiB above the process before the model; allowed = model + the round's updates)")
    print(format_table(server, SERVER_COLUMNS))
    print(f"\nclient (GiB above the process before the model; train_lora, {args.steps} steps, batch {args.batch_size} x {args.seq_len} tokens, rank {args.rank}, CPU float32)")
    print(format_table(client, CLIENT_COLUMNS))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load['end'])}")
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"cpus": os.cpu_count()}
    path = write_results("scale", {"settings": settings, "load_average": load, "server": server, "client": client,
                                   "raw": raw}, **({"out_dir": args.out} if args.out else {}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
