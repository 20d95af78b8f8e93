"""The SecAgg+ neighbour graph: who masks with whom and who holds whose shares.

Bell et al. (CCS 2020) replace Bonawitz's complete graph by a random k-regular graph with
k = O(log n); their construction is a Harary graph over a random permutation, as here:

1. ring order: the participants' ids sorted by SHA-256(round seed + b"flora-secagg/v1/graph"
   + id as 4 bytes big-endian) (ties, which SHA-256 does not produce, by id);
2. each client's neighbours are the k/2 clients before it and the k/2 after it on that ring
   (wrapping), so the graph is symmetric and k-regular; when k >= n - 1 it is complete.

Default k: the smallest even number >= 3 log2(n) (i.e. 2 * ceil(1.5 log2 n)), capped at n - 1:
complete up to 13 clients, 20 at 100, 30 at 1,000. The paper's exact k depends on the
assumed dropout and corruption rates (its Table 2); callers that assume more can pass ``degree``.

Each client's secrets are shared among its k neighbours and itself (k + 1 holders) with
threshold t. Rules on t, checked by ``check_threshold``: t >= 2 (a "sum" of one client is its
input); t <= k + 1 (else nothing can be reconstructed); and 2t > k + 1, so that the holders who
reveal a client's self-mask share and those who reveal its mask-key share (disjoint sets, since
an honest holder reveals one kind only) cannot both reach t.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flora.common.secagg.errors import SecAggError

MAX_CLIENT_ID = 2**32 - 2  # so that id + 1 (the Shamir index) fits 4 bytes
GRAPH_INFO = b"flora-secagg/v1/graph"
ROUND_SEED_BYTES = 32


def check_client_id(client: int, field: str = "client") -> int:
    """A client id is an integer in 0..2^32-2 (the wire layer numbers the round's participants)."""
    if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client <= MAX_CLIENT_ID:
        raise SecAggError(field, f"{client!r} is not a client id in 0..{MAX_CLIENT_ID}")
    return client


def default_degree(n: int) -> int:
    """k for n participants: the smallest even number >= 3 log2 n, at most n - 1."""
    if n <= 1:
        return 0
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def default_threshold(degree: int) -> int:
    """The smallest threshold the rules allow: a strict majority of the k + 1 holders (at least 2)."""
    return max(2, (degree + 1) // 2 + 1)


def check_threshold(threshold: int, degree: int) -> None:
    """Refuse a threshold that reconstructs nothing or lets the server hold both kinds of secret."""
    holders = degree + 1
    if threshold < 2:
        raise SecAggError("threshold", f"{threshold} is below 2 (a sum of one client is its input)")
    if threshold > holders:
        raise SecAggError("threshold", f"{threshold} exceeds the {holders} holders of each client's shares")
    if 2 * threshold <= holders:
        raise SecAggError("threshold", f"{threshold} must exceed half of the {holders} holders of each client's shares")


@dataclass(frozen=True)
class NeighbourGraph:
    """The round's graph: the ring order and each client's neighbours (itself excluded)."""

    order: tuple[int, ...]
    degree: int
    neighbours: Mapping[int, frozenset[int]]

    def holders(self, client: int) -> tuple[int, ...]:
        """Who holds ``client``'s shares, ascending: its neighbours and itself."""
        return tuple(sorted(self.neighbours[client] | {client}))


def ring_order(seed: bytes, participants: Iterable[int]) -> tuple[int, ...]:
    """The participants in the seeded ring order (module doc, step 1)."""
    if len(seed) != ROUND_SEED_BYTES:
        raise SecAggError("round_seed", f"is {len(seed)} bytes, a round seed is {ROUND_SEED_BYTES}")
    ids = [check_client_id(c, "participants") for c in participants]
    if len(set(ids)) != len(ids):
        raise SecAggError("participants", "repeat a client id")

    def rank(client: int) -> tuple[bytes, int]:
        return hashlib.sha256(bytes(seed) + GRAPH_INFO + client.to_bytes(4, "big")).digest(), client

    return tuple(sorted(ids, key=rank))


def neighbour_graph(seed: bytes, participants: Iterable[int], degree: int | None = None) -> NeighbourGraph:
    """The Harary graph of degree k over the seeded ring (module doc); deterministic and symmetric."""
    order = ring_order(seed, participants)
    n = len(order)
    k = default_degree(n) if degree is None else degree
    if k >= n - 1:
        k = max(n - 1, 0)
        neighbours = {c: frozenset(order) - {c} for c in order}
    elif k < 1 or k % 2:
        raise SecAggError("degree", f"{k} must be even and at least 2 when below n - 1 ({n - 1})")
    else:
        half = k // 2
        neighbours = {
            c: frozenset(order[(p + off) % n] for off in range(-half, half + 1) if off)
            for p, c in enumerate(order)
        }
    return NeighbourGraph(order=order, degree=k, neighbours=neighbours)
