"""The few byte layouts of secure aggregation's flora.v1 messages that both sides compute.

- an advertisement's digest (AdvertiseKeysRequest.claims.sha256): SHA-256 of the channel key
  followed by the mask keys in stage order;
- a MASK step's inbox (MaskStep.inbox, fetched): per sealed share the sender's index (4 bytes
  big-endian) then its ciphertext, senders ascending;
- Q in the MASK step of stage 2 (MaskStep.sketch, fetched): per sketched module in plan order,
  d_out x m float32 little-endian row-major, concatenated;
- a masked vector (SubmitMasked's bytes): its uint64 entries little-endian.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from flora.common.secagg.channel import ciphertext_bytes
from flora.common.secagg.messages import EncryptedShare
from flora.common.secagg.plan import RoundPlan

_SENDER = struct.Struct(">I")


def keys_digest(channel_key: bytes, mask_keys: Sequence[bytes]) -> str:
    """The lower-case hex SHA-256 of an advertisement's keys."""
    return hashlib.sha256(bytes(channel_key) + b"".join(bytes(k) for k in mask_keys)).hexdigest()


def _sketched(plan: RoundPlan) -> list[tuple[str, int, int]]:
    return [(m.name, m.d_out, m.columns) for m in plan.modules if not m.dense]


def inbox_bytes(inbox: Sequence[EncryptedShare]) -> bytes:
    """A client's sealed shares as MaskStep.inbox's download carries them."""
    return b"".join(_SENDER.pack(s.sender) + bytes(s.ciphertext) for s in sorted(inbox, key=lambda s: s.sender))


def inbox_size(shares: int, stages: int) -> int:
    """The bytes of an inbox of ``shares`` sealed shares in a round of ``stages`` masked stages."""
    return shares * (_SENDER.size + ciphertext_bytes(stages))


def read_inbox(data: bytes, receiver: int, round_id: int, stages: int) -> tuple[EncryptedShare, ...]:
    """The sealed shares of an inbox download; ValueError when it is not whole records."""
    record = inbox_size(1, stages)
    if len(data) % record:
        raise ValueError(f"secure_aggregation: the inbox is {len(data)} bytes, not a whole number of {record}-byte shares")
    return tuple(EncryptedShare(_SENDER.unpack_from(data, at)[0], receiver, round_id, bytes(data[at + _SENDER.size:at + record]))
                 for at in range(0, len(data), record))


_Q_BYTES = 4  # Q travels in float32 (``flora.common.sketch.broadcast_basis``)


def sketch_size(plan: RoundPlan) -> int:
    """The bytes of Q for ``plan`` (0 when every module is dense)."""
    return sum(rows * cols * _Q_BYTES for _, rows, cols in _sketched(plan))


def sketch_bytes(plan: RoundPlan, q: Mapping[str, torch.Tensor]) -> bytes:
    """Q of every sketched module, as MaskStep.sketch carries it: float32 (the server's Q is
    already float32 values, so nothing is lost here)."""
    return b"".join(q[name].to(torch.float32).contiguous().numpy().astype("<f4").tobytes() for name, _, _ in _sketched(plan))


def read_sketch(plan: RoundPlan, data: bytes) -> dict[str, torch.Tensor]:
    """Q per sketched module from MaskStep.sketch, as float64 values (pass 2's projections are
    computed in float64); ValueError when its length is not the plan's."""
    expected = sketch_size(plan)
    if len(data) != expected:
        raise ValueError(f"secure_aggregation: the sketch is {len(data)} bytes, the plan's Q {expected}")
    q, offset = {}, 0
    for name, rows, cols in _sketched(plan):
        values = np.frombuffer(data, dtype="<f4", count=rows * cols, offset=offset)
        q[name] = torch.from_numpy(values.astype(np.float64).reshape(rows, cols))
        offset += rows * cols * _Q_BYTES
    return q


def vector_bytes(vector: np.ndarray) -> bytes:
    """A uint64 vector as SubmitMasked's bytes carry it."""
    return np.ascontiguousarray(vector, dtype=np.uint64).astype("<u8").tobytes()


def read_vector(data: bytes, length: int) -> np.ndarray:
    """A uint64 vector of ``length`` entries; ValueError when the bytes are not that."""
    if len(data) != 8 * length:
        raise ValueError(f"secure_aggregation: a vector of {length} entries is {8 * length} bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)
