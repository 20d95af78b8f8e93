"""One whole secure-aggregation round in one process: every client and the server, no network.

For tests (exactness, dropouts, what the server holds) and benchmarks, and for the fixed-point
plans' exactness checks. Clients drop on purpose with ``drop_after``: a client named there
completes the stages up to the one given and is silent afterwards ("start": never advertises;
"advertise": advertises, sends no shares; "share": sends shares, no masked input, so its mask key
is recovered; "mask": sends its masked input, no reveals, so its self-mask seed is recovered
from its neighbours' shares).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from flora.common.secagg.client import ClientRound
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.graph import ROUND_SEED_BYTES
from flora.common.secagg.server import ServerRound

DropPoint = Literal["start", "advertise", "share", "mask"]
DROP_POINTS: tuple[str, ...] = ("start", "advertise", "share", "mask")
STAGES: tuple[str, ...] = ("advertise", "share", "mask", "unmask")


@dataclass(eq=False)
class RoundOutcome:
    """The sum the server learned, who it covers, and what each stage cost."""

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    # per stage (advertise, share, mask, unmask): summed over the clients that took part in it
    clients: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    client_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    server_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bytes_up: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def round_seed(seed: bytes | int) -> bytes:
    """A 32-byte round seed from bytes as they are or from an integer (big-endian)."""
    if isinstance(seed, int):
        if not 0 <= seed < 2 ** (8 * ROUND_SEED_BYTES):
            raise SecAggError("seed", f"{seed} does not fit {ROUND_SEED_BYTES} bytes")
        return seed.to_bytes(ROUND_SEED_BYTES, "big")
    return bytes(seed)


def _check_inputs(inputs: Mapping[int, np.ndarray], drop_after: Mapping[int, str]) -> tuple[int, ...]:
    shapes = {x.shape for x in inputs.values() if isinstance(x, np.ndarray)}
    if not inputs or len(shapes) != 1 or any(not isinstance(x, np.ndarray) or x.dtype != np.uint64 for x in inputs.values()):
        raise SecAggError("inputs", "must be uint64 arrays of one shape, at least one")
    for client, point in drop_after.items():
        if client not in inputs or point not in DROP_POINTS:
            raise SecAggError("drop_after", f"{client}: {point!r} needs a client of the round and one of {', '.join(DROP_POINTS)}")
    return next(iter(shapes))


def _alive(client: int, stage: str, drop_after: Mapping[int, str]) -> bool:
    point = drop_after.get(client)
    return point is None or DROP_POINTS.index(point) > STAGES.index(stage)


class _Clock:
    def __init__(self, into: dict[str, float], stage: str) -> None:
        self.into, self.stage = into, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.into[self.stage] += time.perf_counter() - self.start


def run_round(inputs: Mapping[int, np.ndarray], threshold: int, seed: bytes | int,
              drop_after: Mapping[int, DropPoint] | None = None, degree: int | None = None,
              round_id: int = 0) -> RoundOutcome:
    """Run one single-stage round over ``inputs`` (client id -> uint64 array) and return its outcome."""
    drops = dict(drop_after or {})
    shape = _check_inputs(inputs, drops)
    lengths = (int(np.prod(shape)),)
    rseed = round_seed(seed)
    server = ServerRound(round_id, rseed, list(inputs), 1, threshold, degree)
    clients = {c: ClientRound(c, round_id, rseed, 1, threshold, degree) for c in inputs}
    out = RoundOutcome(np.zeros(shape, np.uint64), (), ())
    cs, ss, up, down = out.client_seconds, out.server_seconds, out.bytes_up, out.bytes_down

    def live(stage: str) -> list[int]:
        return [c for c in clients if _alive(c, stage, drops)]

    for c in live("advertise"):
        with _Clock(cs, "advertise"):
            advert = clients[c].advertise()
        out.clients["advertise"] += 1
        up["advertise"] += advert.nbytes
        with _Clock(ss, "advertise"):
            server.receive_keys(advert)
    with _Clock(ss, "advertise"):
        bundles = server.close_keys()
    for c in (c for c in live("share") if c in bundles):
        out.clients["share"] += 1
        down["share"] += bundles[c].nbytes
        with _Clock(cs, "share"):
            sealed = clients[c].share_keys(bundles[c])
        up["share"] += sealed.nbytes
        with _Clock(ss, "share"):
            server.receive_shares(sealed)
    with _Clock(ss, "share"):
        inboxes = server.close_shares()
        request = server.open_stage(1, lengths)
    for c in (c for c in live("mask") if c in inboxes):
        out.clients["mask"] += 1
        down["mask"] += sum(item.nbytes for item in inboxes[c]) + request.nbytes
        with _Clock(cs, "mask"):
            clients[c].receive_shares(inboxes[c])
            masked = clients[c].mask(request, [inputs[c].reshape(-1)])
        up["mask"] += masked.nbytes
        with _Clock(ss, "mask"):
            server.receive_masked(masked)
    with _Clock(ss, "mask"):
        unmask = server.close_masked()
    for c in (c for c in live("unmask") if c in unmask.survivors):
        out.clients["unmask"] += 1
        down["unmask"] += unmask.nbytes
        with _Clock(cs, "unmask"):
            reveals = clients[c].unmask(unmask)
        up["unmask"] += reveals.nbytes
        with _Clock(ss, "unmask"):
            server.receive_unmask(reveals)
    with _Clock(ss, "unmask"):
        result = server.close_unmask()
    out.total, out.survivors, out.dropped = result.sums[0].reshape(shape), result.survivors, result.dropped
    return out


def masked_sum(inputs: Mapping[int, np.ndarray], threshold: int, seed: bytes | int,
               drop_after: Mapping[int, DropPoint] | None = None, degree: int | None = None) -> np.ndarray:
    """The sum mod 2^64 of the inputs of the clients whose masked input arrived, via the full protocol.

    Raises ``SecAggError`` (field ``survivors``) when fewer than ``threshold`` clients survive a
    stage: the round must then be retried.
    """
    return run_round(inputs, threshold, seed, drop_after, degree).total
