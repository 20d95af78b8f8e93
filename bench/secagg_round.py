"""One secure round against one plain flora round, per round and client, excluding training.

For K = 3, 10, 50, 100 clients (ranks 16/8/4/2 cycled) and the shapes of ``bench.secagg_plan``
(one Llama-7B layer's q/v, 4096 x 4096 each; the 1B shape's 32 q/v modules), in one run:

- bytes up and down per client. Plain: the float32 factors up, the round's downlink down.
  Secure: the advertised keys, the sealed shares, the masked uint64 vectors of each pass and
  the revealed shares up; the neighbours' keys, the share inbox, Q and the downlink down.
- client CPU seconds of a secure round: key agreement and sharing (every client, for real),
  opening the share inbox, the clipping / projections / encoding of both passes (median of
  ``--samples`` clients), and the masking: the vector's copy and its k + 1 masks
  (``prg.apply_masks``, timed on each pass's real length). Plain flora's client sends its
  factors as they are (their encoding is not timed).
- server seconds: the key stages (for real), the unmasking of each pass (K self masks removed
  in one ``apply_masks`` pass and the K masked vectors added, timed on the real length), the
  plan's steps (decode, range check, QR) and the downlink's factorization of the result,
  against plain flora's merge (the stack of all K clients) and the downlink's factorization of it.
- wall seconds, excluding training, with the network simulated from the bytes: each client
  has ``--client-mbps`` (100 Mbit/s), the server ``--server-mbps`` (1 Gbit/s) shared by the K
  clients, so moving b bytes per client takes b max(1 / client, K / server); each stage adds one
  round trip of ``--rtt-ms`` (plain: upload and download, 2; secure: advertise, share, then mask
  and unmask per pass, and the download, 5 or 7). Clients work in parallel: a stage costs one
  client's seconds. Wall = round trips + transfers + one client's seconds + the server's.

- Q down in float32 against float64 (before), same run: the wall with Q's extra 4 bytes per
  entry transferred, everything else equal;
- the server's disk work per accepted masked upload, before (the running sum rewritten) and
  after (the upload kept as received, and the JSON state that lists it): measured on the real
  vector length and the round's real keys and shares; not in the wall (uploads overlap).

The issue's target (issue 30): at K = 10 a secure round's wall time <= 2x a plain round's.
Also per round the round's update down before and after (same sums, same run) it was cut to
the public rank bound: formerly a dense-passed module's sum went beside an identity (the downlink
then sent it dense) and a sketched one as Q P^T with all m columns (``finish._dense_pair``,
``finish._cut``).

    python -m bench.secagg_round                              # several minutes, ~4 GB at 1b K = 100
    python -m bench.secagg_round --clients 10 --shapes 4096
    python -m bench.secagg_round --smoke                      # seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from bench.report import RESULTS, write_results
from bench.secagg_plan import CLIP, module_shapes, trained
from flora.common.downlink import Downlink, plan_downlink
from flora.common.aggregation import flora_stack
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.methods import get_method
from flora.common.secagg import finish, shamir
from flora.common.secagg.contribution import ClientChange, client_change, client_contribution
from flora.common.secagg.finish import Sketch, server_step
from flora.common.secagg.graph import default_degree, default_threshold
from flora.common.secagg.inprocess import _Runner, round_seed
from flora.common.secagg.plan import RoundPlan, plan_round, sketch_bases, vector_length
from flora.common.secagg.prg import MaskLabel, apply_masks
from flora.common.secagg.server import ServerRound
from flora.common.secagg.wire import sketch_size
from flora.common.tables import format_table
from flora.server.secure_state import AttemptFiles, Identity, encode_state

MB = 1e6
REVEAL_BYTES = 4 + shamir.SHARE_BYTES  # owner id + share, per revealed share


def downlink_bytes(downlink: Downlink) -> int:
    """What one client downloads of the round's update: every module's numbers in float32."""
    return 4 * sum(m.numel for m in downlink.modules.values())


def masking_seconds(length: int, masks: int) -> float:
    """A client's masking of one pass: its vector copied and ``masks`` masks added in one pass."""
    vector = np.zeros(length, dtype=np.uint64)
    seeds = [(bytes([i + 1]) * 32, MaskLabel("pair", 1, 0), 1 if i % 2 else -1) for i in range(masks)]
    clock = time.perf_counter()
    apply_masks(np.array(vector, dtype=np.uint64), seeds)
    return time.perf_counter() - clock


def unmasking_seconds(length: int, clients: int) -> float:
    """The server's unmasking of one pass with no dropouts: K masked vectors added into the
    running sum, then the K self masks removed in one pass (``ServerRound.close_unmask``)."""
    total, vector = np.zeros(length, dtype=np.uint64), np.ones(length, dtype=np.uint64)
    clock = time.perf_counter()
    for _ in range(clients):
        np.add(total, vector, out=total)
    apply_masks(total, [(bytes([i % 255 + 1]) * 32, MaskLabel("self", 1, i), -1) for i in range(clients)])
    return time.perf_counter() - clock


def persistence_seconds(length: int, server: ServerRound, repeats: int = 3) -> dict[str, float]:
    """The server's durable work per accepted masked upload of ``length`` entries (median of
    ``repeats``), on this machine's disk. Before: the running sum copied and rewritten as
    safetensors (``AttemptFiles.write_masked``: serialized, written, fsynced, renamed). After: the
    upload's own bytes written as received (``write_upload``) and the state JSON that lists it
    (``encode_state`` of the round's real keys and sealed shares, K clients listed)."""
    clients = len(server.participants)
    identity = Identity("bench", 1, 1, tuple(str(i) for i in range(clients)), bytes(32))
    vector = np.random.default_rng(0).integers(0, 2**63, length, dtype=np.uint64)
    listed = {i: "0" * 64 for i in range(clients)}
    with tempfile.TemporaryDirectory(prefix="secagg-persist-") as folder:
        files = AttemptFiles(Path(folder), 1, 1)

        def after() -> None:
            files.write_upload(1, 0, [vector])
            files.write_state(encode_state(identity, server, None, {}, listed))

        after()  # the folder made, caches warm for both
        before = [timed(lambda: files.write_masked(identity, 1, [vector.copy()], range(clients)))[1] for _ in range(repeats)]
        now = [timed(after)[1] for _ in range(repeats)]
    return {"persist_before_s": statistics.median(before), "persist_after_s": statistics.median(now)}


def key_stages(clients: int, passes: int) -> dict[str, float]:
    """Advertise and share for real over K clients: per-client seconds and bytes, the server's seconds,
    and one client's seconds to open its inbox of sealed shares (and the server's state after sharing)."""
    degree = default_degree(clients)
    runner = _Runner(list(range(clients)), default_threshold(degree), round_seed(clients), passes, {}, degree, 1)
    runner.keys_and_shares()
    out = runner.out
    clock = time.perf_counter()
    runner.clients[0].receive_shares(runner.inboxes[0])
    inbox_s = time.perf_counter() - clock
    return {"degree": degree, "server": runner.server, "client_s": sum(out.client_seconds.values()) / clients + inbox_s,
            "server_s": sum(out.server_seconds.values()),
            "up_B": sum(out.bytes_up.values()) / clients + passes * (degree + 1) * REVEAL_BYTES,
            "down_B": (sum(out.bytes_down.values()) + sum(s.nbytes for box in runner.inboxes.values() for s in box)) / clients}


def _former_dense_pair(dense: torch.Tensor, bound: int, seed: int, name: str) -> LoraPair:
    """Before: a dense sum handed to the downlink beside an identity, rank min(d_out, d_in)."""
    d_out, d_in = dense.shape
    if d_out <= d_in:
        return LoraPair(a=dense, b=torch.eye(d_out, dtype=dense.dtype))
    return LoraPair(a=torch.eye(d_in, dtype=dense.dtype), b=dense)


def _former_cut(pair: LoraPair, bound: int) -> LoraPair:
    """Before: Q P^T handed to the downlink with all m columns, the oversampling's included."""
    return pair


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    clock = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - clock


def secure_side(plan: RoundPlan, shapes: dict[str, tuple[int, int]], samples: int, degree: int) -> dict[str, float]:
    """Seconds of the sampled clients' maths and masking (median), the server's unmasking, steps
    and downlink. The server's steps read the round's real sum: every client's clipped, weighted
    change stacked, encoded as one contribution (sums are linear: it differs from the sum of the
    K encodings by the fixed point's rounding alone), so the downlink has the whole round's rank."""
    bases, omega_s = timed(lambda: sketch_bases(plan))
    changes = [client_change(plan, k, trained(shapes, r, k)) for k, r in enumerate(plan.ranks)]
    total = ClientChange(0, dict(flora_stack([LoraAdapter(c.parts, 1.0) for c in changes], [1.0] * plan.clients,
                                             torch.float64).pairs), 1.0, 0.0)
    whole = replace(plan, weights=(1.0,) + plan.weights[1:])  # the sum's bound: the weights' sum, 1
    sampled = range(min(samples, plan.clients))
    client_s = [timed(lambda k=k: _contribution(plan, 1, client_change(plan, k, trained(shapes, plan.ranks[k], k)),
                                                bases))[1] + omega_s for k in sampled]
    step, server_s = timed(lambda: server_step(plan, 1, _contribution(whole, 1, total, bases)))
    first, last_s = None, server_s
    if isinstance(step, Sketch):
        for k in sampled:
            client_s[k] += timed(lambda k=k: _contribution(plan, 2, changes[k], step.sent))[1]
        first = step
        step, last_s = timed(lambda: server_step(plan, 2, _contribution(whole, 2, total, first.sent), first))
        server_s += last_s
    downlink, downlink_s = timed(lambda: plan_downlink(step.delta.pairs))
    row = {"client_maths_s": statistics.median(client_s), "server_maths_s": server_s, "secure_downlink_s": downlink_s,
           "down_update_B": downlink_bytes(downlink)}
    lengths = [vector_length(plan, s) for s in range(1, plan.passes + 1)]
    row["client_mask_s"] = sum(masking_seconds(n, degree + 1) for n in lengths)
    row["server_unmask_s"] = sum(unmasking_seconds(n, plan.clients) for n in lengths)
    last = _contribution(whole, plan.passes, total, bases if first is None else first.sent)
    with mock.patch.object(finish, "_dense_pair", _former_dense_pair), mock.patch.object(finish, "_cut", _former_cut):
        former, former_s = timed(lambda: server_step(plan, plan.passes, last, first))  # the same sum, read as before
    former_downlink, former_downlink_s = timed(lambda: plan_downlink(former.delta.pairs))
    row["down_update_before_B"] = downlink_bytes(former_downlink)
    row["server_maths_before_s"] = server_s - last_s + former_s + former_downlink_s
    return row


def _contribution(plan: RoundPlan, stage: int, change: ClientChange, bases: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate(client_contribution(plan, stage, change, bases))


def plain_side(shapes: dict[str, tuple[int, int]], ranks: list[int]) -> dict[str, float]:
    """Plain flora: the stack of all K clients and the downlink's factorization of it."""
    updates = [trained(shapes, r, k) for k, r in enumerate(ranks)]
    result, merge_s = timed(lambda: get_method("flora").merge(None, updates, [1.0 / len(ranks)] * len(ranks)))
    downlink, downlink_s = timed(lambda: plan_downlink(result.delta.pairs))
    up = statistics.mean(4 * r * sum(d_out + d_in for d_out, d_in in shapes.values()) for r in ranks)
    return {"plain_server_s": merge_s + downlink_s, "plain_up_B": up, "plain_down_B": downlink_bytes(downlink)}


def measure(shape: str, clients: int, ranks: list[int], args: argparse.Namespace, log) -> dict[str, object]:
    """One row: the plan's sizes, each side's seconds and bytes, and the simulated wall times."""
    shapes = module_shapes(shape)
    client_ranks = list(itertools.islice(itertools.cycle(ranks), clients))
    plan = plan_round(get_method("flora"), None, shapes, client_ranks, [2.0] * clients, [1.0 / clients] * clients,
                      CLIP, seed=clients)
    log(f"{shape} K={clients}: {plan.passes} pass(es), {sum(m.dense for m in plan.modules)} dense modules")
    keys = key_stages(clients, plan.passes)
    secure = secure_side(plan, shapes, args.samples, int(keys["degree"]))
    persist = persistence_seconds(max(vector_length(plan, s) for s in range(1, plan.passes + 1)), keys["server"])
    plain = plain_side(shapes, client_ranks)
    q_bytes = sketch_size(plan)  # float32 since the broadcast Q is rounded (before: 8 bytes per entry)
    up = keys["up_B"] + 8 * sum(vector_length(plan, s) for s in range(1, plan.passes + 1))
    down = keys["down_B"] + q_bytes + secure["down_update_B"]
    client_s = keys["client_s"] + secure["client_maths_s"] + secure["client_mask_s"]
    server_s = keys["server_s"] + secure["server_unmask_s"] + secure["server_maths_s"] + secure["secure_downlink_s"]
    per_byte = max(8 / (args.client_mbps * 1e6), 8 * clients / (args.server_mbps * 1e6))  # seconds per byte per client
    rtt = args.rtt_ms / 1000
    plain_wall = 2 * rtt + per_byte * (plain["plain_up_B"] + plain["plain_down_B"]) + plain["plain_server_s"]
    secure_wall = (3 + 2 * plan.passes) * rtt + per_byte * (up + down) + client_s + server_s
    former_wall = secure_wall + per_byte * q_bytes  # before: Q down in float64, twice its float32 bytes
    return {"shape": shape, "K": clients, "degree": keys["degree"], "passes": plan.passes,
            "dense": f"{sum(m.dense for m in plan.modules)}/{len(plan.modules)}",
            "up_MB": up / MB, "plain_up_MB": plain["plain_up_B"] / MB, "down_MB": down / MB,
            "plain_down_MB": plain["plain_down_B"] / MB, "q_MB": q_bytes / MB,
            "client_keys_s": keys["client_s"], "client_maths_s": secure["client_maths_s"],
            "client_mask_s": secure["client_mask_s"], "client_s": client_s,
            "server_keys_s": keys["server_s"], "server_unmask_s": secure["server_unmask_s"],
            "server_maths_s": secure["server_maths_s"] + secure["secure_downlink_s"], "server_s": server_s,
            "plain_server_s": plain["plain_server_s"], "wall_s": secure_wall, "plain_wall_s": plain_wall,
            "wall_ratio": secure_wall / plain_wall, "q_before_MB": 2 * q_bytes / MB, "wall_before_s": former_wall,
            "wall_ratio_before": former_wall / plain_wall,
            "update_down_MB": secure["down_update_B"] / MB,
            "update_down_before_MB": secure["down_update_before_B"] / MB,
            "server_maths_before_s": secure["server_maths_before_s"], **persist}


COLUMNS = {
    "bytes per client (MB)": ["shape", "K", "degree", "passes", "dense", "up_MB", "plain_up_MB", "down_MB", "plain_down_MB",
                              "q_MB"],
    "seconds": ["shape", "K", "client_keys_s", "client_maths_s", "client_mask_s", "client_s", "server_keys_s",
                "server_unmask_s", "server_maths_s", "server_s", "plain_server_s"],
    "wall, excluding training": ["shape", "K", "wall_s", "plain_wall_s", "wall_ratio"],
    "Q down in float64 (before) / float32 (after), same run": [
        "shape", "K", "q_before_MB", "q_MB", "wall_before_s", "wall_s", "wall_ratio_before", "wall_ratio"],
    "the round's update down, before / after the cut to the rank bound": [
        "shape", "K", "dense", "update_down_before_MB", "update_down_MB", "plain_down_MB", "server_maths_before_s",
        "server_maths_s"],
    "the server's disk work per accepted masked upload (s), before / after (not in the wall: uploads overlap)": [
        "shape", "K", "up_MB", "persist_before_s", "persist_after_s"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="3,10,50,100", help="comma-separated K values")
    parser.add_argument("--shapes", default="4096,1b", help="comma-separated: 1b, or d for one layer's d x d q/v")
    parser.add_argument("--ranks", default="16,8,4,2", help="client ranks, cycled over the K clients")
    parser.add_argument("--samples", type=int, default=2, help="clients whose maths is timed per row (median)")
    parser.add_argument("--client-mbps", type=float, default=100.0, help="each client's link, Mbit/s")
    parser.add_argument("--server-mbps", type=float, default=1000.0, help="the server's link, shared by the clients")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="one round trip per stage")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.smoke:  # 256: K = 3 sketched, K = 10 dense
        args.clients, args.shapes, args.samples = "3,10", "256", 2
    ranks = [int(r) for r in args.ranks.split(",")]
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    rows = [measure(shape, int(k), ranks, args, log) for shape in args.shapes.split(",") for k in args.clients.split(",")]
    print(f"\nflora, one round, secure against plain (ranks {args.ranks} cycled; network simulated: clients "
          f"{args.client_mbps:g} Mbit/s, server {args.server_mbps:g} Mbit/s, {args.rtt_ms:g} ms per stage)")
    for title, columns in COLUMNS.items():
        print(f"\n{title}\n{format_table(rows, columns)}")
    ten = [r for r in rows if r["K"] == 10]
    for r in ten:
        verdict = "met" if r["wall_ratio"] <= 2 else "not met"
        print(f"target at K = 10 ({r['shape']}): secure wall {r['wall_s']:.3g} s vs plain {r['plain_wall_s']:.3g} s, "
              f"{r['wall_ratio']:.2f}x: {verdict} (<= 2x)")
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min) at the end: {load}")
    payload = {"ranks": ranks, "samples": args.samples, "client_mbps": args.client_mbps, "server_mbps": args.server_mbps,
               "rtt_ms": args.rtt_ms, "rows": rows, "wall_seconds": time.perf_counter() - start,
               "load_average_1_5_15_min_at_end": load}
    print(f"\nwrote {write_results('secagg_round', payload, args.out)}")


if __name__ == "__main__":
    main()
