"""The messages of one secure-aggregation round, as frozen dataclasses of ints and bytes.

They become protobuf messages in ``flora.v1`` when the stages go on the wire; until then
``nbytes`` gives each one's payload size (ids 4 bytes, round 8, stage 4, keys, ciphertexts,
shares and vectors as they are), before any framing, for the benchmark's bytes per client.

The round, in order (``server.ServerRound`` and ``client.ClientRound`` check it):
AdvertiseKeys (client) -> KeyBundle (server) -> ShareKeys (client) -> inbox of EncryptedShare
(server) -> per stage: MaskRequest (server) -> MaskedInput (client) -> UnmaskRequest (server)
-> UnmaskResponse (client) -> StageResult (server, the sums only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flora.common.secagg.errors import SecAggError
from flora.common.secagg.graph import ROUND_SEED_BYTES

ID_BYTES = 4
ROUND_BYTES = 8
STAGE_BYTES = 4
MAX_STAGES = 8
MAX_ROUND_ID = 2**64 - 1


def check_round_params(round_id: int, round_seed: bytes, stages: int) -> None:
    """Refuse a round id, seed or stage count that the formats cannot carry."""
    if not 0 <= round_id <= MAX_ROUND_ID:
        raise SecAggError("round_id", f"{round_id} is outside 0..2^64-1")
    if len(round_seed) != ROUND_SEED_BYTES:
        raise SecAggError("round_seed", f"is {len(round_seed)} bytes, a round seed is {ROUND_SEED_BYTES}")
    if not 1 <= stages <= MAX_STAGES:
        raise SecAggError("stages", f"{stages} is outside 1..{MAX_STAGES}")


def check_round(round_id: int, expected: int) -> None:
    """Refuse a message of another round (a replay from an earlier one)."""
    if round_id != expected:
        raise SecAggError("round_id", f"{round_id} is not this round ({expected})")


@dataclass(frozen=True)
class AdvertiseKeys:
    """A client's public keys for the round: the share channel's and one mask key per stage."""

    client: int
    round_id: int
    channel_key: bytes
    mask_keys: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + ROUND_BYTES + len(self.channel_key) + sum(len(k) for k in self.mask_keys)


@dataclass(frozen=True)
class KeyBundle:
    """What the server sends each client after advertising: who takes part, its neighbours' keys."""

    round_id: int
    participants: tuple[int, ...]
    neighbours: tuple[AdvertiseKeys, ...]

    @property
    def nbytes(self) -> int:
        return ROUND_BYTES + ID_BYTES * len(self.participants) + sum(a.nbytes for a in self.neighbours)


@dataclass(frozen=True)
class EncryptedShare:
    """The sender's shares for one holder, AES-256-GCM encrypted to it (layout: PROTOCOL.md)."""

    sender: int
    receiver: int
    round_id: int
    ciphertext: bytes

    @property
    def nbytes(self) -> int:
        return 2 * ID_BYTES + ROUND_BYTES + len(self.ciphertext)


@dataclass(frozen=True)
class ShareKeys:
    """A client's encrypted shares, one per neighbour."""

    sender: int
    round_id: int
    shares: tuple[EncryptedShare, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + ROUND_BYTES + sum(s.nbytes for s in self.shares)


@dataclass(frozen=True)
class MaskRequest:
    """The server opens a masked stage: who is still in it and the lengths of its vectors."""

    round_id: int
    stage: int
    active: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ROUND_BYTES + STAGE_BYTES + ID_BYTES * len(self.active) + 8 * len(self.lengths)


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """A client's masked vectors for one stage: uniformly random to anyone without the masks."""

    sender: int
    round_id: int
    stage: int
    vectors: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + ROUND_BYTES + STAGE_BYTES + sum(v.nbytes for v in self.vectors)


@dataclass(frozen=True)
class UnmaskRequest:
    """Who sent a masked input (their self-mask shares are asked) and who did not (mask-key shares)."""

    round_id: int
    stage: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ROUND_BYTES + STAGE_BYTES + ID_BYTES * (len(self.survivors) + len(self.dropped))


@dataclass(frozen=True)
class RevealedShare:
    """One share a holder reveals: whose secret it is and the 70-byte share."""

    owner: int
    share: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """A holder's reveals for one stage: self-mask seed shares of survivors, mask-key shares of the dropped."""

    sender: int
    round_id: int
    stage: int
    self_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]

    @property
    def nbytes(self) -> int:
        reveals = self.self_shares + self.key_shares
        return ID_BYTES + ROUND_BYTES + STAGE_BYTES + sum(ID_BYTES + len(r.share) for r in reveals)


@dataclass(frozen=True, eq=False)
class StageResult:
    """What the server learns from one stage: the sum of the survivors' vectors, and who they were."""

    stage: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    sums: tuple[np.ndarray, ...]
