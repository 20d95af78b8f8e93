"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

``cryptography`` has no secret sharing, so the field arithmetic is written here, small and
tested: Python integers, coefficients from ``secrets`` (the OS CSPRNG), Lagrange interpolation at
0 with modular inverses from ``pow(x, -1, p)``. Shamir's scheme needs no constant-time care beyond
what the reveals already disclose: a share is only ever sent AEAD-encrypted to its holder or
revealed to the server on purpose.

Why 2^521 - 1: a Mersenne prime above 2^256, so every 32-byte secret (an X25519 private key, a
self-mask seed) is a field element as it is, with no encoding.

A share is 70 bytes: the evaluation point x (4 bytes, big-endian, 1..2^32-1; flora uses the
holder's client id + 1) and the value f(x) (66 bytes, big-endian, below p). The secret is f(0)
as 32 bytes big-endian.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from flora.common.secagg.errors import SecAggError

PRIME = 2**521 - 1
SECRET_BYTES = 32
INDEX_BYTES = 4
VALUE_BYTES = 66
SHARE_BYTES = INDEX_BYTES + VALUE_BYTES
MAX_INDEX = 2**32 - 1


@dataclass(frozen=True)
class Share:
    """One point (index, f(index)) of a sharing polynomial."""

    index: int
    value: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= MAX_INDEX:
            raise SecAggError("share", f"index {self.index} is outside 1..{MAX_INDEX}")
        if not 0 <= self.value < PRIME:
            raise SecAggError("share", "value is not an element of GF(2^521 - 1)")

    def to_bytes(self) -> bytes:
        """The 70-byte wire form (module doc)."""
        return self.index.to_bytes(INDEX_BYTES, "big") + self.value.to_bytes(VALUE_BYTES, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        """A share from its wire form, refused unless exactly 70 bytes with a valid index and value."""
        if len(raw) != SHARE_BYTES:
            raise SecAggError("share", f"is {len(raw)} bytes, a share is {SHARE_BYTES}")
        return cls(int.from_bytes(raw[:INDEX_BYTES], "big"), int.from_bytes(raw[INDEX_BYTES:], "big"))


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, threshold: int, indices: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` at ``indices``: any ``threshold`` of them recover it, fewer reveal nothing."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError("secret", f"is {len(secret)} bytes, a shared secret is {SECRET_BYTES}")
    if len(set(indices)) != len(indices):
        raise SecAggError("indices", "repeat an evaluation point")
    if not 1 <= threshold <= len(indices):
        raise SecAggError("threshold", f"{threshold} is outside 1..{len(indices)} (the number of holders)")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in indices]


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret from ``threshold`` shares with distinct indices (the first ``threshold`` are used).

    A result above 2^256 cannot be a shared secret: some share was wrong, which is refused.
    """
    if threshold < 1:
        raise SecAggError("threshold", f"{threshold} is below 1 (no points interpolate to the secret)")
    distinct = {share.index: share for share in shares}
    if len(distinct) != len(shares):
        raise SecAggError("share", "two shares have the same index")
    if len(shares) < threshold:
        raise SecAggError("shares", f"{len(shares)} received, {threshold} needed to reconstruct")
    points = list(shares)[:threshold]
    secret = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * pj.index % PRIME
                den = den * (pj.index - pi.index) % PRIME
        secret = (secret + pi.value * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("share", "the shares are inconsistent (they interpolate to no 32-byte secret)")
    return secret.to_bytes(SECRET_BYTES, "big")
