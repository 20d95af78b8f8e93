"""Cost of secure aggregation's cryptography (flora.common.secagg), in one process.

1. Mask expansion: MB/s of ``prg.expand`` (HKDF stream key + AES-256-CTR keystream read as
   uint64), of ``prg.apply_mask`` (expansion added into a vector mod 2^64) and of
   ``prg.apply_masks`` (21 masks added in one pass, as a client at K = 100 does), against the
   raw stream cipher producing the same number of bytes into a preallocated buffer (the
   ceiling), raw ChaCha20 (the alternative cipher) for reference, and the code each speed-up
   replaced ("before" rows). Medians of ``--repeats``.
2. One whole round (``inprocess.run_round``) at K = 10, 50, 100 clients with vectors of
   ``--length`` uint64 entries (1M by default: 8 MB per client): per stage the client seconds
   (mean per client) and server seconds, payload bytes up and down per client, wall time, with
   and without 10 % of the clients dropping after sharing (their pairwise masks are then removed
   by the server). Baselines in the same run: the plain sum of the K vectors (what a server
   without masking computes) and the plain upload of one vector (8 bytes an entry).

All clients run one after another on one core: client seconds are what one client spends,
the round's wall time is theirs summed plus the server's.

    python -m bench.secagg_prg                 # ~1-2 minutes, ~2 GB RAM at K = 100
    python -m bench.secagg_prg --smoke         # seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bench.report import RESULTS, median_seconds, write_results
from flora.common.secagg.graph import default_degree, default_threshold
from flora.common.secagg.inprocess import STAGES, run_round
from flora.common.secagg.prg import MaskLabel, apply_mask, apply_masks, expand
from flora.common.tables import format_table

MB = 1e6
MASKS = 21  # a client's masks at K = 100: its self mask and one per neighbour (degree 20)


def _former_expand(seed: bytes, label: MaskLabel, length: int) -> None:
    """Before: a zero-filled vector and the mask added into it (baseline of ``prg.expand``)."""
    apply_mask(np.zeros(length, dtype=np.uint64), seed, label, +1)


def _one_mask_at_a_time(acc: np.ndarray, masks: list[tuple[bytes, MaskLabel, int]]) -> None:
    """Before: one pass over the vector per mask (baseline of ``prg.apply_masks``)."""
    for seed, label, sign in masks:
        apply_mask(acc, seed, label, sign)


def prg_rows(length: int, repeats: int, masks: int = MASKS) -> list[dict[str, object]]:
    """Throughput of mask expansion against the raw ciphers on the same bytes, and each speed-up
    against what it replaced (same run): MB are keystream bytes, ``masks`` streams for the
    many-mask rows (a client at K = 100 adds 21: its self mask and 20 pairwise)."""
    nbytes = 8 * length
    zeros, out = bytes(nbytes), bytearray(nbytes + 15)
    key, seed, label = b"\x01" * 32, b"\x02" * 32, MaskLabel("pair", 1, 0)
    acc = np.zeros(length, dtype=np.uint64)
    many = [(bytes([i + 1]) * 32, label, 1 if i % 2 else -1) for i in range(masks)]
    cases = {
        "raw AES-256-CTR (baseline)": (1, lambda: Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(zeros, out)),
        "raw ChaCha20": (1, lambda: Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor().update_into(zeros, out)),
        "prg.expand (keystream into the result)": (1, lambda: expand(seed, label, length)),
        "before: zero-fill, then apply_mask": (1, lambda: _former_expand(seed, label, length)),
        "prg.apply_mask": (1, lambda: apply_mask(acc, seed, label, +1)),
        f"prg.apply_masks, {masks} masks in one pass": (masks, lambda: apply_masks(acc, many)),
        f"before: {masks} x apply_mask, a pass each": (masks, lambda: _one_mask_at_a_time(acc, many)),
    }
    seconds = {name: (streams, median_seconds(fn, repeats)) for name, (streams, fn) in cases.items()}
    base = seconds["raw AES-256-CTR (baseline)"][1]
    return [{"what": name, "MB": streams * nbytes / MB, "seconds": s, "MB_per_s": streams * nbytes / MB / s,
             "vs_raw_aes": streams * base / s} for name, (streams, s) in seconds.items()]


def round_rows(k: int, length: int, drop_fraction: float, seed: int) -> tuple[dict[str, object], list[dict[str, object]]]:
    """One in-process round at K clients: a summary against a plain sum, and a row per stage."""
    rng = np.random.default_rng(seed)
    inputs = {c: rng.integers(0, 2**64, length, dtype=np.uint64, endpoint=False) for c in range(k)}
    drops = {c: "share" for c in range(math.ceil(k * drop_fraction))}
    degree = default_degree(k)
    threshold = default_threshold(degree)
    start = time.perf_counter()
    outcome = run_round(inputs, threshold, seed, drops)  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    start = time.perf_counter()
    plain = np.zeros(length, dtype=np.uint64)
    for c in outcome.survivors:
        np.add(plain, inputs[c], out=plain)
    plain_s = time.perf_counter() - start
    if not np.array_equal(plain, outcome.total):
        raise SystemExit(f"K={k}: the masked sum differs from the plain sum")
    up = sum(outcome.bytes_up[s] / outcome.clients[s] for s in STAGES)
    down = sum(outcome.bytes_down[s] / outcome.clients[s] for s in STAGES if outcome.bytes_down[s])
    summary = {"K": k, "degree": degree, "t": threshold, "dropped": len(drops), "wall_s": wall,
               "plain_sum_s": plain_s, "up_MB_per_client": up / MB, "plain_up_MB": 8 * length / MB,
               "up_vs_plain": up / (8 * length), "down_MB_per_client": down / MB}
    stages = [{"K": k, "dropped": len(drops), "stage": s, "clients": outcome.clients[s],
               "client_s": outcome.client_seconds[s] / outcome.clients[s], "server_s": outcome.server_seconds[s],
               "up_B_per_client": outcome.bytes_up[s] / outcome.clients[s],
               "down_B_per_client": outcome.bytes_down[s] / outcome.clients[s]} for s in STAGES]
    return summary, stages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1_000_000, help="uint64 entries per client vector")
    parser.add_argument("--clients", default="10,50,100", help="comma-separated K")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    length, ks, repeats = args.length, [int(k) for k in args.clients.split(",")], args.repeats
    if args.smoke:
        length, ks, repeats = 2_000, [3, 5], 1
    prg = prg_rows(length, repeats)
    print(format_table(prg, ["what", "MB", "seconds", "MB_per_s", "vs_raw_aes"]))
    measured = [round_rows(k, length, drop, seed=k) for k in ks for drop in (0.0, 0.1)]
    rounds, stages = [m[0] for m in measured], [row for m in measured for row in m[1]]
    print(format_table(rounds, list(rounds[0])))
    print(format_table(stages, list(stages[0])))
    path = write_results("secagg_prg", {"length": length, "prg": prg, "rounds": rounds, "stages": stages}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
