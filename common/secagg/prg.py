"""Mask expansion: a 32-byte seed and a label to a uint64 vector, with AES-256-CTR.

The layout, so that an outside client reproduces a mask bit for bit:

1. stream key K = HKDF-SHA256(ikm = seed, salt = none, length = 32,
   info = b"flora-secagg/v1/prg/" + kind (1 byte: 1 self mask, 2 pairwise mask)
   + stage (4 bytes, big-endian) + vector (4 bytes, big-endian));
2. keystream = AES-256-CTR under K with the initial counter block all zero: block i is
   AES-256_K(i as a 128-bit big-endian integer), i = 0, 1, ... (NIST SP 800-38A);
3. the first 8 * length keystream bytes, read as little-endian uint64 words, are the mask.

A fresh stream key per (kind, stage, vector) means no keystream is ever used twice within a round,
the counter always starts at zero, and a mask expanded for one stage or vector does not cancel
another's. AES-256-CTR rather than ChaCha20: both are standard, AES was the faster of the two on
the development machine, which has AES instructions (1.4x at 8 MB, bench/secagg_prg.py), and CTR
has no 256 GiB per-nonce limit. The keystream is produced in 256 KiB pieces into one reused
buffer and added to the vector while in cache, every mask of a vector in one pass over it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flora.common.secagg.errors import SecAggError

SEED_BYTES = 32
PRG_INFO = b"flora-secagg/v1/prg/"
KINDS: dict[str, int] = {"self": 1, "pair": 2}
MAX_LABEL_INDEX = 2**32 - 1
ZERO_BLOCK = bytes(16)
CHUNK_WORDS = 1 << 15  # 256 KiB of keystream at a time: with as much of the vector, within L2
ZEROS = bytes(8 * CHUNK_WORDS)


@dataclass(frozen=True)
class MaskLabel:
    """Which mask a seed expands to: self or pairwise, for which stage and which vector of it."""

    kind: Literal["self", "pair"]
    stage: int
    vector: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SecAggError("kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("stage", "vector"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_LABEL_INDEX:
                raise SecAggError(name, f"{value} is outside 0..{MAX_LABEL_INDEX}")

    def info(self) -> bytes:
        """The HKDF info string of this label (step 1 of the module doc)."""
        return PRG_INFO + struct.pack(">BII", KINDS[self.kind], self.stage, self.vector)


def stream_key(seed: bytes, label: MaskLabel) -> bytes:
    """The AES-256 key of one mask stream: distinct per seed, kind, stage and vector."""
    if len(seed) != SEED_BYTES:
        raise SecAggError("seed", f"is {len(seed)} bytes, a mask seed is {SEED_BYTES}")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label.info()).derive(bytes(seed))


def _keystream(seed: bytes, label: MaskLabel) -> CipherContext:
    """The AES-256-CTR context of one mask stream, counter at zero (module doc, step 2)."""
    return Cipher(algorithms.AES(stream_key(seed, label)), modes.CTR(ZERO_BLOCK)).encryptor()


def expand(seed: bytes, label: MaskLabel, length: int) -> np.ndarray:
    """The mask of ``length`` uint64 entries that ``seed`` and ``label`` define (module doc): the
    keystream written straight into the result's memory, piece by piece (no zero-fill, no add)."""
    if length < 0:
        raise SecAggError("length", f"{length} is negative")
    encryptor = _keystream(seed, label)
    out = bytearray(8 * length + 15)  # update_into wants a block's room beyond each piece
    view, zeros = memoryview(out), memoryview(ZEROS)
    for start in range(0, 8 * length, 8 * CHUNK_WORDS):
        size = min(8 * CHUNK_WORDS, 8 * length - start)
        encryptor.update_into(zeros[:size], view[start:start + size + 15])
    return np.frombuffer(out, dtype="<u8", count=length).astype(np.uint64, copy=False)


def apply_mask(acc: np.ndarray, seed: bytes, label: MaskLabel, sign: int) -> None:
    """``acc`` += sign * mask, in place, modulo 2^64 (uint64 arithmetic wraps); ``acc`` is 1-D."""
    apply_masks(acc, [(seed, label, sign)])


def apply_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, MaskLabel, int]]) -> None:
    """``acc`` += the sum of sign * mask over ``masks`` (seed, label, sign), in place, mod 2^64.

    One pass over ``acc`` for all the masks: each piece of ``acc`` stays in cache while every
    stream's keystream for it is produced into one reused buffer and added, instead of ``acc``
    going through memory once per mask (a client adds k + 1 masks, the server one per survivor).
    """
    if acc.dtype != np.uint64 or acc.ndim != 1:
        raise SecAggError("vector", "a masked vector is 1-D uint64")
    streams = [(_keystream(seed, label), np.add if sign > 0 else np.subtract) for seed, label, sign in masks]
    buffer = bytearray(8 * CHUNK_WORDS + 15)  # update_into wants room for a block more
    words = np.frombuffer(buffer, dtype="<u8", count=CHUNK_WORDS)
    zeros = memoryview(ZEROS)
    for start in range(0, acc.size, CHUNK_WORDS):
        piece = acc[start:start + CHUNK_WORDS]
        keystream, plain = words[:piece.size], zeros[: 8 * piece.size]
        for encryptor, op in streams:
            encryptor.update_into(plain, buffer)
            op(piece, keystream, out=piece)
