"""One whole secure-aggregation round in one process: every client and the server, no network.

For tests (exactness, dropouts, what the server holds) and benchmarks, and for the fixed-point
plans' exactness checks: ``masked_sum`` for one vector per client, ``masked_stages`` for several
stages whose inputs depend on the previous stage's sum (the two-pass range finder). Clients drop on purpose with ``drop_after``: a client named there
completes the stages up to the one given and is silent afterwards ("start": never advertises;
"advertise": advertises, sends no shares; "share": sends shares, no masked input, so its mask key
is recovered; "mask": sends its masked input, no reveals, so its self-mask seed is recovered
from its neighbours' shares).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Protocol, TypeVar

import numpy as np

from flora.common.secagg.client import ClientRound
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.graph import ROUND_SEED_BYTES
from flora.common.secagg.messages import EncryptedShare, MaskedInput, StageResult
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

    def __init__(self, ids: Sequence[int], threshold: int, seed: bytes, stages: int, drop_after: Mapping[int, str],
                 degree: int | None, round_id: int) -> None:
        self.drop_after = drop_after
        self.server = ServerRound(round_id, seed, ids, stages, threshold, degree)
        self.clients = {c: ClientRound(c, round_id, seed, stages, threshold, degree) for c in ids}
        self.out = RoundOutcome(np.zeros(0, np.uint64), (), ())
        self.inboxes: dict[int, tuple[EncryptedShare, ...]] = {}

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

    def keys_and_shares(self) -> None:
        """Advertise keys and share the secrets: the part of a round that precedes every masked stage."""
        for c in self.live("advertise", self.clients):
            advert = self.client_step("advertise", 0, self.clients[c].advertise)
            self.server_step("advertise", partial(self.server.receive_keys, advert))
        bundles = self.server_step("advertise", self.server.close_keys)
        for c in self.live("share", bundles):
            sealed = self.client_step("share", bundles[c].nbytes, partial(self.clients[c].share_keys, bundles[c]))
            self.server_step("share", partial(self.server.receive_shares, sealed))
        self.inboxes = self.server_step("share", self.server.close_shares)

    def stage(self, stage: int, vectors: Mapping[int, Sequence[np.ndarray]]) -> StageResult:
        """One masked stage: the live active clients mask ``vectors``, the survivors reveal."""
        active = self.live("mask", self.server.active)
        lengths = tuple(v.size for v in vectors[active[0]]) if active else ()
        request = self.server_step("mask", partial(self.server.open_stage, stage, lengths))
        for c in active:
            def step(c: int = c) -> MaskedInput:
                if stage == 1:
                    self.clients[c].receive_shares(self.inboxes[c])
                return self.clients[c].mask(request, [v.reshape(-1) for v in vectors[c]])
            received = request.nbytes + (sum(item.nbytes for item in self.inboxes[c]) if stage == 1 else 0)
            self.server_step("mask", partial(self.server.receive_masked, self.client_step("mask", received, step)))
        unmask = self.server_step("mask", self.server.close_masked)
        for c in self.live("unmask", unmask.survivors):
            reveals = self.client_step("unmask", unmask.nbytes, partial(self.clients[c].unmask, unmask))
            self.server_step("unmask", partial(self.server.receive_unmask, reveals))
        return self.server_step("unmask", self.server.close_unmask)


def run_round(inputs: Mapping[int, np.ndarray], threshold: int, seed: bytes | int,
              drop_after: Mapping[int, DropPoint] | None = None, degree: int | None = None,
              round_id: int = 0) -> RoundOutcome:
    """Run one single-stage round over ``inputs`` (client id -> uint64 array) and return its outcome."""
    drops = dict(drop_after or {})
    shape = _check_inputs(inputs, drops)
    runner = _Runner(list(inputs), threshold, round_seed(seed), 1, drops, degree, round_id)
    runner.keys_and_shares()
    result = runner.stage(1, {c: [x] for c, x in inputs.items()})
    out = runner.out
    out.total, out.survivors, out.dropped = result.sums[0].reshape(shape), result.survivors, result.dropped
    return out


VectorsFor = Callable[[int, int, "StageResult | None"], Sequence[np.ndarray]]


def masked_stages(clients: Sequence[int], threshold: int, seed: bytes | int, stages: int, vectors: VectorsFor,
                  degree: int | None = None, round_id: int = 0) -> list[StageResult]:
    """Several masked stages of one round, each stage's inputs computed from the previous stage's sums.

    ``vectors(stage, client, previous)`` gives a client's uint64 vectors for ``stage`` (1, 2, ...),
    ``previous`` being the result of the stage before (None for stage 1): the shape of the
    two-pass range finder, whose pass-2 inputs depend on pass 1's unmasked sum. No dropouts.
    """
    runner = _Runner(list(clients), threshold, round_seed(seed), stages, {}, degree, round_id)
    runner.keys_and_shares()
    results: list[StageResult] = []
    for stage in range(1, stages + 1):
        previous = results[-1] if results else None
        inputs = {c: vectors(stage, c, previous) for c in sorted(runner.server.active)}
        results.append(runner.stage(stage, inputs))
    return results


def masked_sum(inputs: Mapping[int, np.ndarray], threshold: int, seed: bytes | int,
               drop_after: Mapping[int, DropPoint] | None = None, degree: int | None = None) -> np.ndarray:
    """The sum mod 2^64 of the inputs of the clients whose masked input arrived, via the full protocol.

    Raises ``SecAggError`` (field ``survivors``) when fewer than ``threshold`` clients survive a
    stage: the round must then be retried.
    """
    return run_round(inputs, threshold, seed, drop_after, degree).total
