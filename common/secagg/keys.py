"""X25519 key agreement and the HKDF-SHA256 keys derived from it, all from ``cryptography``.

Each client holds, per round, one key pair for the encrypted share channel and one key pair per
masked stage for the pairwise masks (a fresh mask key per stage, so that recovering a client that
drops in stage 2 reveals nothing about its stage-1 masks: see ``client``). Public keys travel as
their raw 32 bytes (RFC 7748). A public key is refused when it is not 32 bytes or is of low order
(an exchange with it gives the all-zero secret, which ``cryptography`` raises on): a low-order key
would make every mask derived from it public.

Derived keys are HKDF-SHA256 (RFC 5869), no salt, 32 bytes, with
``info = b"flora-secagg/v1/" + label + b"/" + round (8 bytes, big-endian) + a + b`` where a and b
are client ids as 4-byte big-endian integers. The labels:

- ``b"share"``: the AES-256-GCM key of the share channel from sender a to receiver b (ordered,
  so the two directions of a pair use different keys);
- ``b"mask"``: the pairwise mask seed of clients a < b in one stage (unordered, so both compute
  the same seed); the stage is bound by the stage's own key pair and by the PRG label.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flora.common.secagg.errors import SecAggError

KEY_BYTES = 32
INFO_PREFIX = b"flora-secagg/v1/"
SHARE_LABEL = b"share"
MASK_LABEL = b"mask"


def generate_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key from the operating system's CSPRNG."""
    return X25519PrivateKey.generate()


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key, as it is advertised."""
    return private.public_key().public_bytes_raw()


def private_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key, as it is Shamir-shared."""
    return private.private_bytes_raw()


def load_private_key(raw: bytes, field: str = "private_key") -> X25519PrivateKey:
    """A private key from its raw bytes (a reconstructed secret), refused when not 32 bytes."""
    if len(raw) != KEY_BYTES:
        raise SecAggError(field, f"is {len(raw)} bytes, an X25519 private key is {KEY_BYTES}")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def _parse_public(raw: bytes, field: str) -> X25519PublicKey:
    if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_BYTES:
        size = f"{len(raw)} bytes" if isinstance(raw, bytes | bytearray) else f"a {type(raw).__name__}"
        raise SecAggError(field, f"is {size}, an X25519 public key is {KEY_BYTES} bytes")
    return X25519PublicKey.from_public_bytes(bytes(raw))


def _exchange(private: X25519PrivateKey, key: X25519PublicKey, field: str) -> bytes:
    try:
        return private.exchange(key)
    except ValueError as err:
        raise SecAggError(field, "is a low-order point (its exchanges give the all-zero secret)") from err


def load_public_key(raw: bytes, field: str = "public_key") -> X25519PublicKey:
    """A peer's public key, refused when not 32 bytes or of low order (checked by a trial exchange)."""
    key = _parse_public(raw, field)
    _exchange(X25519PrivateKey.generate(), key, field)
    return key


def agree(private: X25519PrivateKey, peer_public: bytes, field: str = "public_key") -> bytes:
    """The raw X25519 shared secret with a peer key, refused as ``load_public_key`` refuses."""
    return _exchange(private, _parse_public(peer_public, field), field)


def derive_key(shared: bytes, label: bytes, round_id: int, a: int, b: int) -> bytes:
    """HKDF-SHA256 of a shared secret bound to a purpose, a round and two client ids (see module doc)."""
    info = INFO_PREFIX + label + b"/" + struct.pack(">QII", round_id, a, b)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def channel_key(private: X25519PrivateKey, peer_public: bytes, round_id: int, sender: int, receiver: int) -> bytes:
    """The AES-256-GCM key of the share channel from ``sender`` to ``receiver``."""
    return derive_key(agree(private, peer_public), SHARE_LABEL, round_id, sender, receiver)


def mask_seed(private: X25519PrivateKey, peer_public: bytes, round_id: int, me: int, peer: int) -> bytes:
    """The pairwise mask seed s_uv that ``me`` and ``peer`` both derive (ids ordered ascending)."""
    lo, hi = min(me, peer), max(me, peer)
    return derive_key(agree(private, peer_public), MASK_LABEL, round_id, lo, hi)
