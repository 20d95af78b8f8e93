"""A client's side of one secure-aggregation round: a state machine with no I/O and no clock.

Per round the client draws a share-channel key pair and, per masked stage s = 1..S, a self-mask
seed b_s and a mask key pair; it Shamir-shares b_s and the mask private key among its SecAgg+
neighbours and itself. Its masked vector j of stage s is

    y = x + PRG(b_s, self, s, j) + sum over active neighbours v of sign(u, v) PRG(s_uv, pair, s, j)

mod 2^64, sign +1 when u < v and -1 otherwise, so the pairwise masks cancel in the sum.

Why a fresh mask key per stage: the server learns the b_s of a stage's survivors; if a survivor
of stage 1 then dropped in stage 2 and its one mask key were recovered, the server would hold
both secrets of stage 1 and could unmask that client's stage-1 vector. With per-stage keys the
client's rule "never reveal both a client's b_s and its mask key of the same stage" is enough.
The client also refuses stage requests that would let a server pair the two otherwise: a stage's
active set must lie within the previous stage's survivors, and a client once reported dropped
never becomes a survivor. These checks bind one client's own view only: a server that shows
different holders different survivors is not detected (protos/PROTOCOL.md, "Threat model").
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from flora.common.secagg import channel, keys, shamir
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.graph import NeighbourGraph, check_client_id, check_threshold, neighbour_graph
from flora.common.secagg.messages import (
    AdvertiseKeys, EncryptedShare, KeyBundle, MaskedInput, MaskRequest, RevealedShare, ShareKeys,
    UnmaskRequest, UnmaskResponse, check_round, check_round_params,
)
from flora.common.secagg.prg import MaskLabel, apply_masks

class ClientRound:
    """One client's secrets and protocol state for one round."""

    def __init__(self, client: int, round_id: int, round_seed: bytes, stages: int, threshold: int,
                 degree: int | None = None) -> None:
        check_round_params(round_id, round_seed, stages)
        self.client = check_client_id(client)
        self.round_id, self.round_seed, self.stages = round_id, bytes(round_seed), stages
        self.threshold, self.degree = threshold, degree
        self._channel = keys.generate_private_key()
        self._mask_keys = [keys.generate_private_key() for _ in range(stages)]
        self._self_seeds = [secrets.token_bytes(shamir.SECRET_BYTES) for _ in range(stages)]
        self._graph: NeighbourGraph | None = None
        self._peers: dict[int, AdvertiseKeys] = {}
        self._held: dict[int, list[channel.StageShares]] = {}  # owner -> its shares I hold, per stage
        self._received = False
        self._active: dict[int, frozenset[int]] = {}  # stage -> its active set, once masked
        self._stage = 0  # the last stage masked
        self._unmasked: dict[int, UnmaskRequest] = {}

    def advertise(self) -> AdvertiseKeys:
        """Stage 0: the public keys for the round."""
        return AdvertiseKeys(self.client, self.round_id, keys.public_bytes(self._channel),
                             tuple(keys.public_bytes(k) for k in self._mask_keys))

    def share_keys(self, bundle: KeyBundle) -> ShareKeys:
        """Check the server's graph and neighbours' keys, then seal this client's shares to each holder."""
        if self._graph is not None:
            raise SecAggError("stage", "shares were already sent this round")
        check_round(bundle.round_id, self.round_id)
        if self.client not in bundle.participants:
            raise SecAggError("participants", f"do not include this client ({self.client})")
        graph = neighbour_graph(self.round_seed, bundle.participants, self.degree)
        check_threshold(self.threshold, graph.degree)
        peers = self._check_neighbours(bundle.neighbours, graph)
        holders = graph.holders(self.client)
        per_stage = [self._split(stage, holders) for stage in range(self.stages)]
        by_holder = {h: [(b[i], s[i]) for b, s in per_stage] for i, h in enumerate(holders)}
        sealed = tuple(
            EncryptedShare(self.client, v, self.round_id,
                           channel.seal(self._channel, peers[v].channel_key, self.round_id, self.client, v, by_holder[v]))
            for v in sorted(graph.neighbours[self.client])
        )
        self._graph, self._peers = graph, peers
        self._held = {self.client: by_holder[self.client]}
        return ShareKeys(self.client, self.round_id, sealed)

    def _check_neighbours(self, adverts: Sequence[AdvertiseKeys], graph: NeighbourGraph) -> dict[int, AdvertiseKeys]:
        peers = {a.client: a for a in adverts}
        if len(peers) != len(adverts) or set(peers) != graph.neighbours[self.client]:
            raise SecAggError("neighbours", "are not this client's neighbours in the round's graph")
        for advert in adverts:
            check_round(advert.round_id, self.round_id)
            if len(advert.mask_keys) != self.stages:
                raise SecAggError("mask_keys", f"client {advert.client} sent {len(advert.mask_keys)}, {self.stages} expected")
            for key in (advert.channel_key, *advert.mask_keys):
                keys.load_public_key(key, f"public_key of client {advert.client}")
        return peers

    def _split(self, stage: int, holders: tuple[int, ...]) -> tuple[list[shamir.Share], list[shamir.Share]]:
        indices = [h + 1 for h in holders]
        b = shamir.split(self._self_seeds[stage], self.threshold, indices)
        s = shamir.split(keys.private_bytes(self._mask_keys[stage]), self.threshold, indices)
        return b, s

    def receive_shares(self, inbox: Sequence[EncryptedShare]) -> None:
        """Decrypt the neighbours' shares addressed to this client; all or nothing."""
        if self._graph is None or self._received:
            raise SecAggError("stage", "shares are received once, after this client sent its own")
        opened: dict[int, list[channel.StageShares]] = {}
        for item in inbox:
            check_round(item.round_id, self.round_id)
            if item.receiver != self.client:
                raise SecAggError("receiver", f"{item.receiver} is not this client ({self.client})")
            if item.sender not in self._peers:
                raise SecAggError("sender", f"{item.sender} is not a neighbour of client {self.client}")
            if item.sender in opened:
                raise SecAggError("sender", f"client {item.sender}'s shares arrived twice")
            opened[item.sender] = channel.open_sealed(
                self._channel, self._peers[item.sender].channel_key, self.round_id, item.sender, self.client,
                item.ciphertext, self.stages)
        self._held.update(opened)
        self._received = True

    def mask(self, request: MaskRequest, vectors: Sequence[np.ndarray]) -> MaskedInput:
        """Mask this stage's vectors (module doc); refused out of order or with a suspicious active set."""
        check_round(request.round_id, self.round_id)
        stage = request.stage
        if not self._received or stage != self._stage + 1 or stage > self.stages:
            raise SecAggError("stage", f"{stage} is not the next stage to mask (last masked: {self._stage})")
        if self._stage and self._stage not in self._unmasked:
            raise SecAggError("stage", f"stage {self._stage} was not unmasked yet")
        active = frozenset(request.active)
        self._check_active(active, stage)
        masked = self._masked_vectors(request, vectors, active)
        self._stage = stage
        self._active[stage] = active
        return MaskedInput(self.client, self.round_id, stage, masked)

    @property
    def _known_graph(self) -> NeighbourGraph:
        if self._graph is None:
            raise SecAggError("stage", "the round's graph is not known before the key bundle")
        return self._graph

    def _check_active(self, active: frozenset[int], stage: int) -> None:
        allowed = frozenset(self._known_graph.order) if stage == 1 else frozenset(self._unmasked[stage - 1].survivors)
        if self.client not in active or not active <= allowed:
            raise SecAggError("active", f"stage {stage}'s set is not within the previous stage's survivors")
        if len(active) < self.threshold:
            raise SecAggError("active", f"{len(active)} clients, below the threshold {self.threshold}")
        if stage == 1 and active & self._known_graph.neighbours[self.client] != set(self._held) - {self.client}:
            raise SecAggError("active", "neighbours in it are not those whose shares this client holds")

    def _masked_vectors(self, request: MaskRequest, vectors: Sequence[np.ndarray],
                        active: frozenset[int]) -> tuple[np.ndarray, ...]:
        if len(vectors) != len(request.lengths):
            raise SecAggError("vectors", f"{len(vectors)} given, {len(request.lengths)} expected")
        for j, (x, n) in enumerate(zip(vectors, request.lengths, strict=True)):
            if not isinstance(x, np.ndarray) or x.dtype != np.uint64 or x.size != n:
                raise SecAggError("vectors", f"vector {j} must be uint64 with {n} entries")
        s = request.stage
        seeds = {
            v: keys.mask_seed(self._mask_keys[s - 1], self._peers[v].mask_keys[s - 1], self.round_id, self.client, v)
            for v in sorted(self._known_graph.neighbours[self.client] & active)
        }
        out = []
        for j, x in enumerate(vectors):
            y = np.array(x, dtype=np.uint64).reshape(-1)
            pairs = [(seed, MaskLabel("pair", s, j), +1 if self.client < v else -1) for v, seed in seeds.items()]
            apply_masks(y, [(self._self_seeds[s - 1], MaskLabel("self", s, j), +1), *pairs])
            out.append(y)
        return tuple(out)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal self-mask shares of survivors and mask-key shares of the dropped, never both for one client."""
        check_round(request.round_id, self.round_id)
        stage = request.stage
        if stage != self._stage or stage == 0:
            raise SecAggError("stage", f"{stage} is not the stage this client masked ({self._stage})")
        survivors, dropped = frozenset(request.survivors), frozenset(request.dropped)
        previous = self._unmasked.get(stage)
        if previous is not None and (set(previous.survivors), set(previous.dropped)) != (survivors, dropped):
            raise SecAggError("dropped", f"differ from stage {stage}'s earlier request: a client's two secrets would be revealed")
        if survivors & dropped:
            raise SecAggError("dropped", "include survivors: a client's two secrets would be revealed")
        if self.client not in survivors or survivors | dropped != self._active[stage]:
            raise SecAggError("survivors", f"with the dropped are not stage {stage}'s active clients")
        if len(survivors) < self.threshold:
            raise SecAggError("survivors", f"{len(survivors)}, below the threshold {self.threshold}: the round must be retried")
        reveal_b = tuple(RevealedShare(o, self._held[o][stage - 1][0].to_bytes()) for o in sorted(survivors & set(self._held)))
        reveal_s = tuple(RevealedShare(o, self._held[o][stage - 1][1].to_bytes()) for o in sorted(dropped & set(self._held)))
        self._unmasked[stage] = request
        return UnmaskResponse(self.client, self.round_id, stage, reveal_b, reveal_s)
