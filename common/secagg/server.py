"""The server's side of one secure-aggregation round: a state machine with no I/O and no clock.

Each ``receive_*`` validates a message completely before it changes anything, so a refused
message (malformed, replayed, late, from a client not in the stage) leaves the round as it was.
Each ``close_*`` ends a stage at its deadline with whoever answered, and refuses when fewer than
the threshold did: the round must then be retried (nothing secret was asked for yet).

What the server holds: public keys, ciphertexts it cannot open, and per stage the running sum
of the masked inputs (never one client's input alone). At unmasking it asks the survivors for
self-mask shares of the clients whose masked input arrived and for mask-key shares of those
whose did not, never both for one client, and once it has asked, a late masked input is refused.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from flora.common.secagg import keys, shamir
from flora.common.secagg.channel import ciphertext_bytes
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.graph import NeighbourGraph, check_client_id, check_threshold, neighbour_graph
from flora.common.secagg.messages import (
    AdvertiseKeys, EncryptedShare, KeyBundle, MaskedInput, MaskRequest, RevealedShare, ShareKeys,
    StageResult, UnmaskRequest, UnmaskResponse, check_round, check_round_params,
)
from flora.common.secagg.prg import MaskLabel, apply_masks


def _phase_error(expected: str, phase: str) -> SecAggError:
    return SecAggError("stage", f"the round is at {phase!r}, not {expected!r}")


class ServerRound:
    """The server's protocol state for one round over ``participants`` (client ids)."""

    def __init__(self, round_id: int, round_seed: bytes, participants: Sequence[int], stages: int,
                 threshold: int, degree: int | None = None) -> None:
        check_round_params(round_id, round_seed, stages)
        self.participants = frozenset(check_client_id(c, "participants") for c in participants)
        if not 2 <= threshold <= len(self.participants):
            raise SecAggError("threshold", f"{threshold} is outside 2..{len(self.participants)} (the participants)")
        self.round_id, self.round_seed, self.stages = round_id, bytes(round_seed), stages
        self.threshold, self.degree = threshold, degree
        self.phase = "advertise"
        self.adverts: dict[int, AdvertiseKeys] = {}
        self.graph: NeighbourGraph | None = None
        self.sealed: dict[int, ShareKeys] = {}
        self.stage = 0
        self.active: frozenset[int] = frozenset()
        self.lengths: tuple[int, ...] = ()
        self.masked_sum: list[np.ndarray] = []  # the running sum of the masked inputs, per vector
        self.masked_from: set[int] = set()
        self.request: UnmaskRequest | None = None
        self.reveals: dict[int, UnmaskResponse] = {}

    def _require(self, phase: str) -> None:
        if self.phase != phase:
            raise _phase_error(phase, self.phase)

    def _check_sender(self, stage: int, sender: int, expected: Collection[int], seen: Collection[int], what: str) -> None:
        """Refuse a message of another stage, from a client not expected in it, or a second one."""
        if stage != self.stage:
            raise SecAggError("stage", f"{stage} is not the current stage {self.stage}")
        if sender not in expected:
            raise SecAggError("sender", f"{sender} is not expected to send {what} in stage {self.stage}")
        if sender in seen:
            raise SecAggError("sender", f"{sender}'s {what} for stage {self.stage} arrived twice")

    def _refuse_too_few(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise SecAggError("survivors", f"{count} {what}, below the threshold {self.threshold}: the round must be retried")

    # advertise keys
    def receive_keys(self, advert: AdvertiseKeys) -> None:
        """A client's public keys, validated (sizes, low order) and kept once."""
        self._require("advertise")
        check_round(advert.round_id, self.round_id)
        if advert.client not in self.participants:
            raise SecAggError("client", f"{advert.client} is not a participant of this round")
        if advert.client in self.adverts:
            raise SecAggError("client", f"{advert.client} already advertised its keys")
        if len(advert.mask_keys) != self.stages:
            raise SecAggError("mask_keys", f"{len(advert.mask_keys)} sent, {self.stages} expected (one per stage)")
        for key in (advert.channel_key, *advert.mask_keys):
            keys.load_public_key(key)
        self.adverts[advert.client] = advert

    def close_keys(self) -> dict[int, KeyBundle]:
        """End advertising: the graph over those who advertised, and each one's neighbours' keys."""
        self._require("advertise")
        self._refuse_too_few(len(self.adverts), "clients advertised keys")
        graph = neighbour_graph(self.round_seed, self.adverts, self.degree)
        check_threshold(self.threshold, graph.degree)
        participants = tuple(sorted(self.adverts))
        bundles = {
            u: KeyBundle(self.round_id, participants, tuple(self.adverts[v] for v in sorted(graph.neighbours[u])))
            for u in participants
        }
        self.graph, self.phase = graph, "share"
        return bundles

    # share keys
    def receive_shares(self, message: ShareKeys) -> None:
        """A client's sealed shares: exactly one per neighbour, of the exact length."""
        self._require("share")
        check_round(message.round_id, self.round_id)
        graph = self._known_graph
        u = message.sender
        if u not in graph.neighbours:
            raise SecAggError("sender", f"{u} did not advertise keys this round")
        if u in self.sealed:
            raise SecAggError("sender", f"{u} already sent its shares")
        receivers = [s.receiver for s in message.shares]
        if len(set(receivers)) != len(receivers) or set(receivers) != graph.neighbours[u]:
            raise SecAggError("receiver", f"client {u}'s shares are not one per neighbour")
        for item in message.shares:
            check_round(item.round_id, self.round_id)
            if item.sender != u:
                raise SecAggError("sender", f"a share in client {u}'s message claims sender {item.sender}")
            if len(item.ciphertext) != ciphertext_bytes(self.stages):
                raise SecAggError("ciphertext", f"is {len(item.ciphertext)} bytes, {ciphertext_bytes(self.stages)} expected")
        self.sealed[u] = message

    def close_shares(self) -> dict[int, tuple[EncryptedShare, ...]]:
        """End sharing: each sharer's inbox, refused when a neighbourhood keeps fewer than t holders."""
        self._require("share")
        graph = self._known_graph
        senders = frozenset(self.sealed)
        self._refuse_too_few(len(senders), "clients sent their shares")
        for u in senders:
            self._refuse_too_few(len(set(graph.holders(u)) & senders), f"holders of client {u}'s shares remain")
        inbox: dict[int, list[EncryptedShare]] = {u: [] for u in senders}
        for u in sorted(senders):
            for item in self.sealed[u].shares:
                if item.receiver in senders:
                    inbox[item.receiver].append(item)
        self.active, self.phase = senders, "open"
        return {u: tuple(items) for u, items in inbox.items()}

    @property
    def _known_graph(self) -> NeighbourGraph:
        if self.graph is None:
            raise _phase_error("share", self.phase)
        return self.graph

    # masked input
    def open_stage(self, stage: int, lengths: Sequence[int]) -> MaskRequest:
        """Open masked stage ``stage`` (1, 2, ... in order) for vectors of ``lengths`` entries."""
        self._require("open")
        if stage != self.stage + 1 or stage > self.stages:
            raise SecAggError("stage", f"{stage} is not the next stage (1..{self.stages}, last {self.stage})")
        if any(n < 0 for n in lengths):
            raise SecAggError("lengths", "must be non-negative")
        self._refuse_too_few(len(self.active), f"clients remain for stage {stage}")
        self.stage, self.lengths = stage, tuple(int(n) for n in lengths)
        self.masked_sum = [np.zeros(n, dtype=np.uint64) for n in self.lengths]
        self.masked_from, self.request, self.reveals = set(), None, {}
        self.phase = "mask"
        return MaskRequest(self.round_id, stage, tuple(sorted(self.active)), self.lengths)

    def receive_masked(self, message: MaskedInput) -> None:
        """Add a masked input to the stage's running sum; refused when late, replayed or malformed."""
        self.check_masked(message)
        for acc, y in zip(self.masked_sum, message.vectors, strict=True):
            np.add(acc, y, out=acc)
        self.masked_from.add(message.sender)

    def check_masked(self, message: MaskedInput) -> None:
        """Refuse a masked input ``receive_masked`` would refuse, changing nothing (a caller may
        keep the input durably first, then add it)."""
        u = message.sender
        if self.phase != "mask" and u in self.active and message.stage == self.stage:
            raise SecAggError("stage", f"stage {self.stage}'s masked inputs are closed: client {u} counts as dropped")
        self._require("mask")
        check_round(message.round_id, self.round_id)
        self._check_sender(message.stage, u, self.active, self.masked_from, "a masked input")
        if len(message.vectors) != len(self.lengths):
            raise SecAggError("vectors", f"{len(message.vectors)} sent, {len(self.lengths)} expected")
        for j, (y, n) in enumerate(zip(message.vectors, self.lengths, strict=True)):
            if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (n,):
                raise SecAggError("vectors", f"vector {j} must be {n} uint64 entries")

    def close_masked(self) -> UnmaskRequest:
        """End the masked inputs: survivors give self-mask shares, the dropped are recovered by key."""
        self._require("mask")
        graph = self._known_graph
        survivors, dropped = frozenset(self.masked_from), self.active - self.masked_from
        self._refuse_too_few(len(survivors), "masked inputs arrived")
        for u in survivors | self._to_recover(dropped, survivors):
            self._refuse_too_few(len(set(graph.holders(u)) & survivors), f"holders of client {u}'s shares survive")
        self.request = UnmaskRequest(self.round_id, self.stage, tuple(sorted(survivors)), tuple(sorted(dropped)))
        self.phase = "unmask"
        return self.request

    def _to_recover(self, dropped: frozenset[int], survivors: frozenset[int]) -> frozenset[int]:
        """The dropped clients that some survivor masked with (the others need nothing recovered)."""
        graph = self._known_graph
        return frozenset(w for w in dropped if graph.neighbours[w] & survivors)

    # unmasking
    def receive_unmask(self, response: UnmaskResponse) -> None:
        """A survivor's reveals, checked against what it was asked: shares only of what it holds."""
        self._require("unmask")
        check_round(response.round_id, self.round_id)
        request, graph = self._asked, self._known_graph
        u = response.sender
        self._check_sender(response.stage, u, request.survivors, self.reveals, "reveals")
        owners_of_u = graph.neighbours[u] | {u}
        self._check_reveals(u, response.self_shares, owners_of_u & set(request.survivors), "self_shares")
        self._check_reveals(u, response.key_shares, owners_of_u & set(request.dropped), "key_shares")
        self.reveals[u] = response

    @staticmethod
    def _check_reveals(holder: int, reveals: Sequence[RevealedShare], allowed: set[int], field: str) -> None:
        owners = [r.owner for r in reveals]
        if len(set(owners)) != len(owners) or not set(owners) <= allowed:
            raise SecAggError(field, f"client {holder} revealed shares it was not asked for")
        for r in reveals:
            if shamir.Share.from_bytes(r.share).index != holder + 1:
                raise SecAggError(field, f"client {holder}'s share of client {r.owner} is not at its index {holder + 1}")

    @property
    def _asked(self) -> UnmaskRequest:
        if self.request is None:
            raise _phase_error("unmask", self.phase)
        return self.request

    def _reconstruct(self, owner: int, field: str) -> bytes:
        shares = [shamir.Share.from_bytes(r.share) for resp in self.reveals.values()
                  for r in getattr(resp, field) if r.owner == owner]
        self._refuse_too_few(len(shares), f"shares of client {owner} revealed")
        return shamir.combine(shares, self.threshold)

    def close_unmask(self) -> StageResult:
        """Remove the survivors' self masks and the dropped clients' pairwise masks: the sums alone."""
        self._require("unmask")
        request, graph = self._asked, self._known_graph
        survivors = frozenset(request.survivors)
        seeds = {u: self._reconstruct(u, "self_shares") for u in request.survivors}
        dropped_keys = {}
        for w in sorted(self._to_recover(frozenset(request.dropped), survivors)):
            private = keys.load_private_key(self._reconstruct(w, "key_shares"), "key_shares")
            if keys.public_bytes(private) != self.adverts[w].mask_keys[self.stage - 1]:
                raise SecAggError("key_shares", f"reconstruct a key that is not client {w}'s advertised mask key")
            dropped_keys[w] = private
        pairs = [  # (seed, sign in v's mask) of each survivor v's mask with a dropped neighbour w
            (keys.mask_seed(private, self.adverts[v].mask_keys[self.stage - 1], self.round_id, w, v), 1 if v < w else -1)
            for w, private in dropped_keys.items() for v in sorted(graph.neighbours[w] & survivors)
        ]
        sums = [acc.copy() for acc in self.masked_sum]
        for j, acc in enumerate(sums):
            apply_masks(acc, [(seed, MaskLabel("self", self.stage, j), -1) for seed in seeds.values()]
                        + [(seed, MaskLabel("pair", self.stage, j), -sign) for seed, sign in pairs])
        self.active, self.masked_sum = frozenset(self.reveals), []
        self.phase = "open" if self.stage < self.stages else "done"
        return StageResult(self.stage, request.survivors, request.dropped, tuple(sums))
