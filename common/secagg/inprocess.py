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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Protocol, TypeVar

import numpy as np

from flora.common.secagg.client import ClientRound
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.graph import ROUND_SEED_BYTES
from flora.common.secagg.messages import EncryptedShare, KeyBundle, MaskedInput, StageResult, UnmaskRequest
from flora.common.secagg.server import ServerRound

DropPoint = Literal["start", "advertise", "share", "mask"]
DROP_POINTS: tuple[str, ...] = ("start", "advertise", "share", "mask")
STAGES: tuple[str, ...] = ("advertise", "share", "mask", "unmask")
_T = TypeVar("_T")


class _Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


_Message = TypeVar("_Message", bound=_Sized)


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


class _Runner:
    """The round's clients and server, each stage a method; times and counts into a RoundOutcome."""

    def __init__(self, inputs: Mapping[int, np.ndarray], threshold: int, seed: bytes, drop_after: Mapping[int, str],
                 degree: int | None, round_id: int) -> None:
        self.inputs, self.drop_after = inputs, drop_after
        self.server = ServerRound(round_id, seed, list(inputs), 1, threshold, degree)
        self.clients = {c: ClientRound(c, round_id, seed, 1, threshold, degree) for c in inputs}
        self.out = RoundOutcome(np.zeros(0, np.uint64), (), ())

    def live(self, stage: str, among: Collection[int]) -> list[int]:
        """The clients of ``among`` that have not dropped before ``stage``."""
        def alive(c: int) -> bool:
            point = self.drop_after.get(c)
            return point is None or DROP_POINTS.index(point) > STAGES.index(stage)
        return [c for c in self.clients if c in among and alive(c)]

    def client_step(self, stage: str, received: int, step: Callable[[], _Message]) -> _Message:
        """One client's turn in ``stage``: what it received, its seconds, what it sent."""
        self.out.clients[stage] += 1
        self.out.bytes_down[stage] += received
        start = time.perf_counter()
        message = step()
        self.out.client_seconds[stage] += time.perf_counter() - start
        self.out.bytes_up[stage] += message.nbytes
        return message

    def server_step(self, stage: str, step: Callable[[], _T]) -> _T:
        start = time.perf_counter()
        result = step()
        self.out.server_seconds[stage] += time.perf_counter() - start
        return result

    def advertise(self) -> dict[int, KeyBundle]:
        for c in self.live("advertise", self.clients):
            advert = self.client_step("advertise", 0, self.clients[c].advertise)
            self.server_step("advertise", partial(self.server.receive_keys, advert))
        return self.server_step("advertise", self.server.close_keys)

    def share(self, bundles: Mapping[int, KeyBundle]) -> dict[int, tuple[EncryptedShare, ...]]:
        for c in self.live("share", bundles):
            sealed = self.client_step("share", bundles[c].nbytes, partial(self.clients[c].share_keys, bundles[c]))
            self.server_step("share", partial(self.server.receive_shares, sealed))
        return self.server_step("share", self.server.close_shares)

    def mask(self, inboxes: Mapping[int, tuple[EncryptedShare, ...]], length: int) -> UnmaskRequest:
        request = self.server_step("share", partial(self.server.open_stage, 1, (length,)))
        for c in self.live("mask", inboxes):
            def step(c: int = c) -> MaskedInput:
                self.clients[c].receive_shares(inboxes[c])
                return self.clients[c].mask(request, [self.inputs[c].reshape(-1)])
            received = sum(item.nbytes for item in inboxes[c]) + request.nbytes
            self.server_step("mask", partial(self.server.receive_masked, self.client_step("mask", received, step)))
        return self.server_step("mask", self.server.close_masked)

    def unmask(self, request: UnmaskRequest) -> StageResult:
        for c in self.live("unmask", request.survivors):
            reveals = self.client_step("unmask", request.nbytes, partial(self.clients[c].unmask, request))
            self.server_step("unmask", partial(self.server.receive_unmask, reveals))
        return self.server_step("unmask", self.server.close_unmask)


def run_round(inputs: Mapping[int, np.ndarray], threshold: int, seed: bytes | int,
              drop_after: Mapping[int, DropPoint] | None = None, degree: int | None = None,
              round_id: int = 0) -> RoundOutcome:
    """Run one single-stage round over ``inputs`` (client id -> uint64 array) and return its outcome."""
    drops = dict(drop_after or {})
    shape = _check_inputs(inputs, drops)
    runner = _Runner(inputs, threshold, round_seed(seed), drops, degree, round_id)
    result = runner.unmask(runner.mask(runner.share(runner.advertise()), int(np.prod(shape))))
    out = runner.out
    out.total, out.survivors, out.dropped = result.sums[0].reshape(shape), result.survivors, result.dropped
    return out


def masked_sum(inputs: Mapping[int, np.ndarray], threshold: int, seed: bytes | int,
               drop_after: Mapping[int, DropPoint] | None = None, degree: int | None = None) -> np.ndarray:
    """The sum mod 2^64 of the inputs of the clients whose masked input arrived, via the full protocol.

    Raises ``SecAggError`` (field ``survivors``) when fewer than ``threshold`` clients survive a
    stage: the round must then be retried.
    """
    return run_round(inputs, threshold, seed, drop_after, degree).total
