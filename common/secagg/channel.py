"""The encrypted share channel: a client's shares for one holder, sealed with AES-256-GCM.

Key: ``keys.channel_key`` (HKDF label ``share``, ordered sender -> receiver), so each direction of
each pair in each round has its own key and carries exactly one message; the nonce is therefore
12 zero bytes. Associated data: b"flora-secagg/v1/share" + round (8 bytes big-endian) + sender
(4) + receiver (4): a ciphertext moved to another round, sender or receiver fails to decrypt.
Plaintext: for each stage 1..S in order, the 70-byte share of the self-mask seed b then the
70-byte share of the stage's mask private key (``shamir.Share.to_bytes``): 140 S bytes, and
140 S + 16 bytes of ciphertext with the GCM tag.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flora.common.secagg.errors import SecAggError
from flora.common.secagg.keys import channel_key
from flora.common.secagg.shamir import SHARE_BYTES, Share

NONCE = bytes(12)
AD_PREFIX = b"flora-secagg/v1/share"
TAG_BYTES = 16
StageShares = tuple[Share, Share]  # (self-mask seed share, mask private key share)


def ciphertext_bytes(stages: int) -> int:
    """The exact ciphertext length for a round of ``stages`` masked stages."""
    return 2 * SHARE_BYTES * stages + TAG_BYTES


def _ad(round_id: int, sender: int, receiver: int) -> bytes:
    return AD_PREFIX + struct.pack(">QII", round_id, sender, receiver)


def seal(private: X25519PrivateKey, receiver_key: bytes, round_id: int, sender: int, receiver: int,
         shares: Sequence[StageShares]) -> bytes:
    """Encrypt one holder's shares (all stages) from ``sender`` to ``receiver``."""
    plaintext = b"".join(b.to_bytes() + s.to_bytes() for b, s in shares)
    key = channel_key(private, receiver_key, round_id, sender, receiver)
    return AESGCM(key).encrypt(NONCE, plaintext, _ad(round_id, sender, receiver))


def open_sealed(private: X25519PrivateKey, sender_key: bytes, round_id: int, sender: int, receiver: int,
                ciphertext: bytes, stages: int) -> list[StageShares]:
    """Decrypt and parse the shares ``sender`` sealed for ``receiver``; refuse anything else.

    Refused: a wrong length, a ciphertext that does not authenticate (another sender's, another
    receiver's, another round's, or altered), a share whose index is not the receiver's.
    """
    if len(ciphertext) != ciphertext_bytes(stages):
        raise SecAggError("ciphertext", f"is {len(ciphertext)} bytes, {ciphertext_bytes(stages)} expected")
    key = channel_key(private, sender_key, round_id, sender, receiver)
    try:
        plaintext = AESGCM(key).decrypt(NONCE, bytes(ciphertext), _ad(round_id, sender, receiver))
    except InvalidTag as err:
        raise SecAggError("ciphertext", f"does not authenticate as from client {sender} to client {receiver}") from err
    parts = [Share.from_bytes(plaintext[i:i + SHARE_BYTES]) for i in range(0, len(plaintext), SHARE_BYTES)]
    if any(p.index != receiver + 1 for p in parts):
        raise SecAggError("share", f"is not at client {receiver}'s index {receiver + 1}")
    return [(parts[2 * i], parts[2 * i + 1]) for i in range(stages)]
