"""Omega, the sketch's public matrix: the recipe PROTOCOL.md states ("The sketch matrix Omega"),
rebuilt here from standard primitives alone, gives the matrix the code draws; the check values
printed there hold; and the private release and the secure plan draw the same Omega."""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from flora.common.methods import get_method
from flora.common.omega import gaussians, omega_key, round_seed, sketch_basis, uniforms
from flora.common.privacy.release import sketch_omegas
from flora.common.secagg.plan import plan_round, sketch_bases

MODULE = "model.layers.0.self_attn.q_proj"
# PROTOCOL.md's check values: sketch seed 1, this module, d_in 6, m 3.
KEY = "e351873f771b0010c713379bbf52ad28275fb95cf8a7ca4c01f70c8169d995f8"
FIRST_WORDS = (0x920723A0F8C5D5A5, 0x6129F184D8CF2EB3)
FIRST_NORMALS = (-0.7703466642237767, 0.7275477164643083, -1.0398230707893503, 0.1361651048967828)
OMEGA_ROW_0 = (-0.831303772933325, 0.13385663063517947, -0.001074644903502345)
OMEGA_ROW_5 = (-0.19186556279865094, 0.38016695895185976, 0.7201637367822131)


def reference_omega(seed: int, module: str, d_in: int, columns: int) -> list[list[float]]:
    """PROTOCOL.md's recipe step by step, from hmac/hashlib, raw AES blocks and math alone:
    HKDF-SHA256 (RFC 5869), AES-256-CTR as AES of big-endian counters, 53-bit uniforms,
    Box-Muller, and modified Gram-Schmidt (which gives R's diagonal positive by construction)."""
    prk = hmac.new(b"\0" * 32, seed.to_bytes(8, "big"), hashlib.sha256).digest()  # salt none = 32 zero bytes
    key = hmac.new(prk, b"flora-sketch/v1/omega/" + module.encode() + b"\x01", hashlib.sha256).digest()
    count = d_in * columns + (d_in * columns) % 2
    aes = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    stream = b"".join(aes.update(i.to_bytes(16, "big")) for i in range(math.ceil(8 * count / 16)))
    words = struct.unpack(f"<{count}Q", stream[: 8 * count])
    u = [((w >> 11) + 0.5) * 2.0**-53 for w in words]
    z = []
    for j in range(0, count, 2):
        radius, angle = math.sqrt(-2.0 * math.log(u[j])), 2.0 * math.pi * u[j + 1]
        z += [radius * math.cos(angle), radius * math.sin(angle)]
    cols = [[z[i * columns + c] for i in range(d_in)] for c in range(columns)]  # G filled row by row
    basis: list[list[float]] = []
    for v in cols:
        for q in basis:
            dot = sum(a * b for a, b in zip(q, v))
            v = [a - dot * b for a, b in zip(v, q)]
        norm = math.sqrt(sum(a * a for a in v))
        basis.append([a / norm for a in v])
    return [[basis[c][i] for c in range(columns)] for i in range(d_in)]


def test_the_check_values_of_protocol_md():
    key = omega_key(1, MODULE)
    assert key.hex() == KEY
    assert uniforms(key, 2).tolist() == [((w >> 11) + 0.5) * 2.0**-53 for w in FIRST_WORDS]
    assert gaussians(key, 4).tolist() == pytest.approx(FIRST_NORMALS, abs=1e-15)
    omega = sketch_basis(6, 3, 1, MODULE)
    assert omega[0].tolist() == pytest.approx(OMEGA_ROW_0, abs=1e-12)
    assert omega[5].tolist() == pytest.approx(OMEGA_ROW_5, abs=1e-12)
    assert round_seed(0, 1) == 0x584146DF0F0BFFDA


@pytest.mark.parametrize(("seed", "module", "d_in", "columns"), [(1, MODULE, 6, 3), (2**64 - 1, "m.ü", 40, 7), (0, "x", 9, 9)])
def test_the_recipe_rebuilt_from_standard_primitives_gives_the_same_omega(seed, module, d_in, columns):
    want = torch.tensor(reference_omega(seed, module, d_in, columns), dtype=torch.float64)
    got = sketch_basis(d_in, columns, seed, module)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.allclose(got.T @ got, torch.eye(columns, dtype=torch.float64), atol=1e-12)  # the DP bound's premise


def test_a_seed_outside_uint64_or_too_many_columns_is_refused():
    with pytest.raises(ValueError, match="outside 0..2\\^64-1"):
        omega_key(2**64, MODULE)
    with pytest.raises(ValueError, match="columns 7 outside 1..d_in"):
        sketch_basis(6, 7, 1, MODULE)


def test_the_private_release_and_the_secure_plan_draw_the_same_omega():
    shapes = {"m.q": (96, 80), "m.v": (64, 112)}
    plan = plan_round(get_method("flora"), None, shapes, [4, 2], [1.0, 1.0], [0.5, 0.5], 1.0, round_seed(11, 3))
    columns = {m.name: m.columns for m in plan.modules}
    assert all(columns.values())  # both sketched
    private = sketch_omegas(shapes, columns, 11, 3)
    for name, omega in sketch_bases(plan).items():
        assert torch.equal(omega, private[name])
