"""Secure aggregation's primitives: keys, mask expansion, Shamir shares, the neighbour graph."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.common.secagg import channel, graph, keys, shamir
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.prg import CHUNK_WORDS, MaskLabel, apply_mask, apply_masks, expand

LOW_ORDER = [  # the X25519 points of small order (and their non-canonical encodings)
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
]


# keys
def test_public_keys_of_wrong_size_are_refused() -> None:
    for size in (0, 31, 33, 64):
        with pytest.raises(SecAggError, match="public_key: is .* an X25519 public key is 32 bytes") as err:
            keys.load_public_key(b"\x09" * size)
        assert err.value.field == "public_key"
    with pytest.raises(SecAggError, match="private_key"):
        keys.load_private_key(b"\x01" * 31)


@pytest.mark.parametrize("point", LOW_ORDER)
def test_low_order_public_keys_are_refused(point: str) -> None:
    with pytest.raises(SecAggError, match="low-order"):
        keys.load_public_key(bytes.fromhex(point))
    with pytest.raises(SecAggError, match="low-order"):
        keys.mask_seed(keys.generate_private_key(), bytes.fromhex(point), 1, 0, 1)


def test_pairwise_seed_is_symmetric_and_bound_to_round_and_pair() -> None:
    a, b = keys.generate_private_key(), keys.generate_private_key()
    pa, pb = keys.public_bytes(a), keys.public_bytes(b)
    seed = keys.mask_seed(a, pb, 7, 3, 9)
    assert seed == keys.mask_seed(b, pa, 7, 9, 3)
    assert len(seed) == 32
    assert seed != keys.mask_seed(a, pb, 8, 3, 9)
    assert seed != keys.mask_seed(a, pb, 7, 3, 10)
    # the share channel is directional: one key per sender -> receiver
    assert keys.channel_key(a, pb, 7, 3, 9) == keys.channel_key(b, pa, 7, 3, 9)
    assert keys.channel_key(a, pb, 7, 3, 9) != keys.channel_key(a, pb, 7, 9, 3)
    assert keys.channel_key(a, pb, 7, 3, 9) != seed


def test_derive_key_follows_the_documented_hkdf_info() -> None:
    shared = bytes(range(32))
    info = b"flora-secagg/v1/mask/" + struct.pack(">QII", 5, 1, 2)
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    assert keys.derive_key(shared, b"mask", 5, 1, 2) == expected


def test_sealed_shares_follow_the_documented_channel_layout() -> None:
    """Key: HKDF label share (sender, receiver); nonce: 12 zero bytes; AD: prefix, round, sender, receiver."""
    u, v = keys.generate_private_key(), keys.generate_private_key()
    stage_shares = [(shamir.split(b"b" * 32, 2, [4, 8])[1], shamir.split(b"s" * 32, 2, [4, 8])[1])] * 2
    sealed = channel.seal(u, keys.public_bytes(v), 9, 3, 7, stage_shares)
    assert len(sealed) == channel.ciphertext_bytes(2) == 2 * 140 + 16
    key = keys.derive_key(v.exchange(u.public_key()), b"share", 9, 3, 7)
    ad = b"flora-secagg/v1/share" + struct.pack(">QII", 9, 3, 7)
    plaintext = AESGCM(key).decrypt(bytes(12), sealed, ad)
    assert plaintext == b"".join(b.to_bytes() + s.to_bytes() for b, s in stage_shares)
    assert channel.open_sealed(v, keys.public_bytes(u), 9, 3, 7, sealed, 2) == stage_shares
    with pytest.raises(SecAggError, match="does not authenticate"):
        channel.open_sealed(v, keys.public_bytes(u), 10, 3, 7, sealed, 2)


# PRG
def _reference_mask(seed: bytes, kind: int, stage: int, vector: int, length: int) -> np.ndarray:
    info = b"flora-secagg/v1/prg/" + bytes([kind]) + stage.to_bytes(4, "big") + vector.to_bytes(4, "big")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * length))
    return np.array(struct.unpack(f"<{length}Q", stream), dtype=np.uint64)


@pytest.mark.parametrize("length", [0, 1, 3, CHUNK_WORDS - 1, CHUNK_WORDS, CHUNK_WORDS + 5])
def test_mask_expansion_follows_the_documented_layout(length: int) -> None:
    seed = bytes(range(32))
    np.testing.assert_array_equal(expand(seed, MaskLabel("pair", 2, 1), length), _reference_mask(seed, 2, 2, 1, length))


KNOWN_ANSWER = ["6a6b90ff9704154d", "4919dc9eebec8588"]


def test_mask_expansion_known_answer() -> None:
    """Pins the layout: an outside client's implementation must print these words."""
    words = expand(bytes(range(32)), MaskLabel("self", 1, 0), 2)
    np.testing.assert_array_equal(words, _reference_mask(bytes(range(32)), 1, 1, 0, 2))
    assert [f"{int(w):016x}" for w in words] == KNOWN_ANSWER


def test_labels_separate_the_masks() -> None:
    seed = b"\x42" * 32
    labels = [MaskLabel(k, s, j) for k, s, j in itertools.product(("self", "pair"), (1, 2), (0, 1))]
    masks = {expand(seed, label, 8).tobytes() for label in labels}
    assert len(masks) == len(labels)
    with pytest.raises(SecAggError, match="kind"):
        MaskLabel("both", 1, 0)  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="seed"):
        expand(b"short", labels[0], 4)


def test_apply_mask_wraps_mod_2_64_and_cancels() -> None:
    x = np.array([0, 1, 2**64 - 1, 12345], dtype=np.uint64)
    y = x.copy()
    apply_mask(y, b"\x07" * 32, MaskLabel("pair", 1, 0), +1)
    assert not np.array_equal(x, y)
    apply_mask(y, b"\x07" * 32, MaskLabel("pair", 1, 0), -1)
    np.testing.assert_array_equal(x, y)



@pytest.mark.parametrize("length", [0, 5, CHUNK_WORDS, 2 * CHUNK_WORDS + 7])
def test_many_masks_in_one_pass_equal_the_reference_masks_added_mod_2_64(length: int) -> None:
    """apply_masks (every mask per piece of the vector) adds exactly what the reference expansion
    of each mask gives, across piece boundaries, signs mixed, wrapping mod 2^64."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2**64, length, dtype=np.uint64, endpoint=False)
    masks = [(bytes([i]) * 32, MaskLabel("pair" if i else "self", 2, 1), -1 if i % 2 else +1) for i in range(4)]
    expected = x.copy()
    for seed, label, sign in masks:
        reference = _reference_mask(seed, 1 if label.kind == "self" else 2, 2, 1, length)
        expected = expected + reference if sign > 0 else expected - reference
        np.testing.assert_array_equal(expand(seed, label, length), reference)
    y = x.copy()
    apply_masks(y, masks)
    np.testing.assert_array_equal(y, expected)


# Shamir
def test_shares_round_trip_with_any_threshold_subset() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 5, 9, 2**32 - 1])
    for subset in itertools.combinations(shares, 3):
        parsed = [shamir.Share.from_bytes(s.to_bytes()) for s in subset]
        assert all(len(s.to_bytes()) == shamir.SHARE_BYTES == 70 for s in subset)
        assert shamir.combine(parsed, 3) == secret
    with pytest.raises(SecAggError, match="inconsistent"):  # below the threshold: no 32-byte secret
        shamir.combine(shares[:2], 2)


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), holders=st.integers(1, 12), data=st.data())
def test_any_threshold_of_the_shares_recovers_any_secret(secret: bytes, holders: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, holders))
    indices = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=holders, max_size=holders, unique=True))
    shares = shamir.split(secret, threshold, indices)
    subset = data.draw(st.permutations(shares))[:threshold]
    assert shamir.combine([shamir.Share.from_bytes(s.to_bytes()) for s in subset], threshold) == secret


@settings(max_examples=30, deadline=None)
@given(ids=st.sets(st.integers(0, graph.MAX_CLIENT_ID), min_size=1, max_size=60), seed=st.binary(min_size=32, max_size=32))
def test_every_default_graph_is_symmetric_and_regular(ids: set[int], seed: bytes) -> None:
    g = graph.neighbour_graph(seed, ids)
    assert set(g.order) == ids and g.degree == graph.default_degree(len(ids))
    for u, nbrs in g.neighbours.items():
        assert len(nbrs) == g.degree and u not in nbrs and all(u in g.neighbours[v] for v in nbrs)


def test_too_few_or_inconsistent_shares_are_refused() -> None:
    secret = b"\xff" * 32
    shares = shamir.split(secret, 3, [1, 2, 3, 4])
    with pytest.raises(SecAggError, match="2 received, 3 needed"):
        shamir.combine(shares[:2], 3)
    with pytest.raises(SecAggError, match="same index"):
        shamir.combine([shares[0], shares[0], shares[1]], 3)
    tampered = shamir.Share(shares[0].index, (shares[0].value + 1) % shamir.PRIME)
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.combine([tampered, shares[1], shares[2]], 3)


@pytest.mark.parametrize("threshold", [0, -1])
def test_combine_refuses_a_threshold_below_one(threshold: int) -> None:
    """Lagrange over no points gives 0: a threshold below 1 would return the all-zero secret
    instead of refusing."""
    shares = shamir.split(b"\x01" * 32, 2, [1, 2, 3])
    with pytest.raises(SecAggError, match="threshold") as err:
        shamir.combine(shares, threshold)
    assert err.value.field == "threshold"


@pytest.mark.parametrize("raw, reason", [
    (b"\x00" * 69, "is 69 bytes"),
    (b"\x00" * 71, "is 71 bytes"),
    (b"\x00" * 70, "index 0"),
    (b"\x00\x00\x00\x01" + b"\xff" * 66, "not an element"),
])
def test_malformed_shares_are_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(SecAggError, match=reason) as err:
        shamir.Share.from_bytes(raw)
    assert err.value.field == "share"


def test_split_refuses_bad_parameters() -> None:
    with pytest.raises(SecAggError, match="secret"):
        shamir.split(b"x" * 31, 2, [1, 2])
    with pytest.raises(SecAggError, match="threshold"):
        shamir.split(b"x" * 32, 3, [1, 2])
    with pytest.raises(SecAggError, match="repeat"):
        shamir.split(b"x" * 32, 2, [1, 1, 2])


# graph
def test_graph_is_deterministic_symmetric_and_regular() -> None:
    ids = list(range(0, 300, 3))
    seed = b"\x01" * 32
    g = graph.neighbour_graph(seed, ids)
    assert g == graph.neighbour_graph(seed, list(reversed(ids)))
    assert g.degree == graph.default_degree(len(ids)) == 20
    for u, nbrs in g.neighbours.items():
        assert len(nbrs) == g.degree and u not in nbrs
        assert all(u in g.neighbours[v] for v in nbrs)
    assert graph.neighbour_graph(b"\x02" * 32, ids).neighbours != g.neighbours


def test_graph_ring_order_follows_the_documented_hash() -> None:
    import hashlib
    seed, ids = b"\x05" * 32, [4, 8, 15, 16, 23, 42]
    expected = sorted(ids, key=lambda c: hashlib.sha256(seed + b"flora-secagg/v1/graph" + c.to_bytes(4, "big")).digest())
    g = graph.neighbour_graph(seed, ids, degree=2)
    assert g.order == tuple(expected)
    for p, c in enumerate(expected):
        assert g.neighbours[c] == {expected[p - 1], expected[(p + 1) % len(ids)]}


def test_the_default_graph_is_complete_up_to_13_clients_as_documented() -> None:
    """PROTOCOL.md's "complete graph up to 13 clients, 20 at n = 100" (30 at 1,000 in graph.py)."""
    assert all(graph.default_degree(n) == n - 1 for n in range(2, 14))
    assert graph.default_degree(14) == 12 < 13
    assert (graph.default_degree(100), graph.default_degree(1000)) == (20, 30)


def test_small_graphs_are_complete_and_degrees_checked() -> None:
    g = graph.neighbour_graph(b"\x00" * 32, range(5))
    assert g.degree == 4 and all(len(n) == 4 for n in g.neighbours.values())
    with pytest.raises(SecAggError, match="degree"):
        graph.neighbour_graph(b"\x00" * 32, range(10), degree=3)
    with pytest.raises(SecAggError, match="participants"):
        graph.neighbour_graph(b"\x00" * 32, [1, 1, 2])
    with pytest.raises(SecAggError, match="round_seed"):
        graph.neighbour_graph(b"\x00" * 31, [1, 2])
    with pytest.raises(SecAggError, match="client id"):
        graph.check_client_id(-1)


@pytest.mark.parametrize("threshold, degree, reason", [
    (1, 4, "below 2"), (6, 4, "exceeds the 5 holders"), (2, 4, "exceed half of the 5"), (3, 5, "exceed half of the 6"),
])
def test_thresholds_that_leak_or_cannot_reconstruct_are_refused(threshold: int, degree: int, reason: str) -> None:
    with pytest.raises(SecAggError, match=reason):
        graph.check_threshold(threshold, degree)
    graph.check_threshold(graph.default_threshold(degree), degree)
