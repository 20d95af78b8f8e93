"""Benchmark: a client's memory and training speed with a float32, bf16, int8 and nf4 base.

A constrained data holder picks a small rank *and* a quantized base (``flora-client --quantize``).
DESIGN.md section 8's target: the model part of an nf4 client at most 0.4x the bf16 client's.
Each precision trains the same random Llama of each shape for the same steps on the same packed
synthetic batches, in its own spawned process (so that one's peak memory cannot hide another's):

- model MiB: the bytes the model holds (parameters, buffers and the quantization scales), all
  of it and its linear layers alone (what nf4/int8 quantize; embeddings and head stay as they are);
- load MiB: the process's resident high-water mark while the client loads the base from a bf16
  checkpoint (as real models ship) and quantizes it, less its resident size before: float32 and
  bf16 as ``load_model`` reads them, int8/nf4 as ``flora-client --quantize`` does (the checkpoint
  memory-mapped in its own dtype, each linear layer quantized in turn); "load anon MiB" is its
  anonymous part (sampled), what the kernel cannot drop, without the mapped checkpoint's pages;
- peak MiB: the same high-water mark over the round (restarted after loading; the CUDA
  allocator's peak on a GPU): the model, the LoRA, its optimiser state and the activations;
- tokens/s of ``train_round`` (the daemon's round, the quantized base with its held update).

bf16 is the baseline every ratio is taken against. On the CPU bitsandbytes' 4-bit and 8-bit
kernels are slow reference paths: their tokens/s say nothing about a GPU.

    python -m bench.train --precisions float32,bf16,int8,nf4       # shapes tiny and small
    python -m bench.precision --shapes small --precision-steps 5      # the same, directly
    python -m bench.precision --shapes 0.3b,1b --precision-steps 2 --batch-size 1 --seq-len 32
    python -m bench.precision --smoke
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from bench.report import RESULTS, write_results
from bench.scale import SHAPES, RssTrace, Shape, rss_and_anonymous, reset_peak, write_model
from flora.common.quantize import is_quantized
from flora.common.tables import format_table

PRECISIONS = ("float32", "bf16", "int8", "nf4")
# "small": a ~20M-parameter Llama whose linear layers are most of it, as in any real model.
BENCH_SHAPES = {"tiny": SHAPES["tiny"], "small": Shape(512, 1376, 4, 8, 4, 8192, False), "0.3b": SHAPES["0.3b"],
                "1b": SHAPES["1b"]}
COLUMNS = ["shape", "precision", "model MiB", "x bf16", "linear MiB", "linear x bf16", "load MiB", "load x bf16",
           "load anon MiB", "peak MiB", "peak x bf16", "tokens/s"]
LOAD_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}  # int8, nf4: the checkpoint's own ("auto")
MiB = 1 << 20


def shape_model(shape: Shape, device: str, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised (seeded) Llama of ``shape`` in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def model_bytes(model: nn.Module, linear_only: bool = False) -> int:
    """Bytes of the model's parameters, buffers and quantization scales (when ``linear_only``: of the
    linear layers a quantization replaces, which are all but the output head)."""
    head = model.get_output_embeddings()
    modules = [m for m in model.modules() if (type(m) is nn.Linear or is_quantized(m)) and m is not head]
    modules = modules if linear_only else [model]
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    scales = sum(_scale_bytes(m) for m in (modules if linear_only else model.modules()) if is_quantized(m))
    return sum(t.numel() * t.element_size() for t in tensors.values()) + scales


def _scale_bytes(module: nn.Module) -> int:
    """The scales a quantized layer keeps outside its parameters (4-bit absmax, nested; int8 row scales)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    tensors = [getattr(weight, "SCB", None)]
    while state is not None:
        tensors += [state.absmax, state.code]
        state = getattr(state, "state2", None)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def client_round(
    shape_name: str, precision: str, device: str, steps: int, batch: int, seq_len: int, checkpoint: str
) -> dict[str, Any]:
    """Child process: load ``checkpoint`` at ``precision``, run one round; model bytes, peaks, tokens/s."""
    from bench.train import packed_chunks, synthetic_examples
    from flora.client.local_weights import local_weights
    from flora.client.round_start import train_round
    from flora.client.trainer import TrainConfig
    from flora.common.basemodel import BUILTIN_MODEL, load_model, load_tokenizer, target_module_shapes
    from flora.common.methods import ClientStart

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cuda = device != "cpu"
    # bf16 beside the quantized layers on the CPU too, so that only the quantization differs from bf16.
    compute = torch.float32 if precision == "float32" else torch.bfloat16
    chunks = packed_chunks(synthetic_examples(64 * steps), load_tokenizer(BUILTIN_MODEL), seq_len, batch * steps)
    before, before_anon = (torch.cuda.memory_allocated(), 0) if cuda else rss_and_anonymous(psutil.Process())
    with RssTrace() as trace:
        start = time.perf_counter()
        quantized = precision not in LOAD_DTYPES
        model = load_model(checkpoint, LOAD_DTYPES.get(precision, "auto"), "cpu" if quantized else device)
        names = sorted(target_module_shapes(model, None))  # the family's default targets
        local = local_weights(model, names, precision if quantized else "none", compute, torch.device(device))
        loaded = time.perf_counter()
    load = (torch.cuda.max_memory_allocated() if cuda else _high_water_mark()) - before
    load_anon = 0 if cuda else trace.peak(start, loaded, anonymous=True) - before_anon
    reset_peak()  # the round's peak, apart from the loading's
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(rank=8, max_steps=steps, batch_size=batch, device=device, learning_rate=1e-4)
    start = time.perf_counter()
    result = train_round(local, chunks, config, ClientStart(None, None))
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _high_water_mark()
    return {"model_bytes": model_bytes(local.model), "linear_bytes": model_bytes(local.model, linear_only=True),
            "load_bytes": load, "load_anon_bytes": load_anon, "peak_bytes": peak - before,
            "tokens_per_s": result.tokens / seconds}


def _write_checkpoint(shape_name: str, folder: str) -> None:
    """Child process: the shape's random bf16 checkpoint, as real models ship."""
    write_model(BENCH_SHAPES[shape_name], Path(folder))


def _high_water_mark() -> int:
    from bench.loopback import _status_bytes

    return _status_bytes(os.getpid(), "VmHWM")


def _child_main(conn: Any, fn: Any, kwargs: dict[str, Any]) -> None:
    try:
        conn.send(("ok", fn(**kwargs)))
    except BaseException as error:  # the parent reports it; the child only exits
        conn.send(("error", f"{type(error).__name__}: {error}"))


def in_child(fn: Any = None, **kwargs: Any) -> Any:
    """``fn`` (default ``client_round``) in a fresh spawned process (a clean high-water mark); its result."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_child_main, args=(child, fn or client_round, kwargs))
    process.start()
    try:
        status, value = parent.recv()
    finally:
        process.join()
    if status != "ok":
        raise RuntimeError(f"{kwargs.get('precision', 'checkpoint')} at {kwargs['shape_name']}: {value}")
    return value


def precision_rows(
    shapes: list[str], precisions: list[str], device: str, steps: int, batch: int, seq_len: int
) -> list[dict[str, Any]]:
    """One row per shape and precision, each ratio against bf16 of the same shape."""
    rows = []
    for shape in shapes:
        with tempfile.TemporaryDirectory(prefix=f"flora-precision-{shape}-") as checkpoint:
            in_child(_write_checkpoint, shape_name=shape, folder=checkpoint)  # out of this process's memory
            results = {p: in_child(shape_name=shape, precision=p, device=device, steps=steps, batch=batch,
                                   seq_len=seq_len, checkpoint=checkpoint) for p in precisions}
        base = results.get("bf16")
        for precision, r in results.items():
            rows.append({
                "shape": shape, "precision": precision, "model MiB": r["model_bytes"] / MiB,
                "x bf16": r["model_bytes"] / base["model_bytes"] if base else None,
                "linear MiB": r["linear_bytes"] / MiB,
                "linear x bf16": r["linear_bytes"] / base["linear_bytes"] if base else None,
                "load MiB": r["load_bytes"] / MiB, "load x bf16": r["load_bytes"] / base["load_bytes"] if base else None,
                "load anon MiB": r["load_anon_bytes"] / MiB,
                "peak MiB": r["peak_bytes"] / MiB, "peak x bf16": r["peak_bytes"] / base["peak_bytes"] if base else None,
                "tokens/s": r["tokens_per_s"],
            })
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this benchmark shares with ``bench.train --precisions``."""
    parser.add_argument("--shapes", default="tiny,small", help=f"comma-separated, of {', '.join(BENCH_SHAPES)}")
    parser.add_argument("--precision-steps", type=int, default=5, help="optimiser steps per precision's round")


def run(args: argparse.Namespace, precisions: list[str]) -> Path:
    """Measure, print the table, write ``<out>/<name>.json``; returns its path."""
    from flora.common.devices import resolve_device

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise SystemExit(f"--precisions: {unknown[0]!r} is not one of {', '.join(PRECISIONS)}")
    device = str(resolve_device(args.device))
    shapes = ["tiny"] if args.smoke else args.shapes.split(",")
    steps = 2 if args.smoke else args.precision_steps
    rows = precision_rows(shapes, precisions, device, steps, args.batch_size, args.seq_len)
    print(format_table(rows, COLUMNS))
    payload = {"device": device, "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "rows": rows}
    return write_results(args.name, payload, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="precision")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.seq_len = 2, 32
    print(f"wrote {run(args, args.precisions.split(','))}")


if __name__ == "__main__":
    main()
