"""Omega, the sketch's public d_in x m matrix with orthonormal columns, from a seed and a module name.

The private release (issue 31) and secure aggregation's plan (issue 30) project every change
through the same Omega, and under secure aggregation each client draws it itself, in whatever
language it is written in. So the recipe is a byte-level one (PROTOCOL.md, "The sketch matrix
Omega"), reproducible to float round-off anywhere:

1. key K = HKDF-SHA256(ikm = the sketch seed as 8 bytes big-endian, salt none, length 32,
   info = "flora-sketch/v1/omega/" || the module name in UTF-8);
2. keystream AES-256-CTR under K from the all-zero counter block (block i = AES_K(i as a 128-bit
   big-endian integer), as the masks' PRG), read as little-endian uint64 words w_0, w_1, ...;
3. uniforms u_i = ((w_i >> 11) + 1/2) 2^-53: 53 random bits, in (0, 1), never 0 (log is finite);
4. standard normals by Box-Muller over consecutive pairs: with r = sqrt(-2 ln u_2j) and
   t = 2 pi u_2j+1, z_2j = r cos t and z_2j+1 = r sin t; the first d_in m of them fill the Gaussian
   matrix G (d_in x m) row by row;
5. Omega = the Q factor of G's thin QR with R's diagonal positive: unique for a G of full column
   rank (a Gaussian matrix has it with probability one), so Householder, modified Gram-Schmidt or
   a library QR with its columns' signs fixed all give the same Omega to round-off.

What each use needs from it: exactness of the range finder needs only that Y = sum_k D_k Omega_k
spans the sum's range, which holds for any Omegas in general position, even if the clients'
differ by round-off (pass 2 uses the one broadcast Q); the DP sensitivity and the fixed-point
bound need Omega's columns orthonormal, so that |D_k Omega|_F <= |D_k|_F (to round-off, which the
bound's 10^-9 slack covers). The round's seed (``round_seed``) is public and the same for both.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import Tensor

OMEGA_INFO = b"flora-sketch/v1/omega/"
SEED_INFO = "flora-sketch/v1/seed"
MAX_SEED = 2**64 - 1


def round_seed(run_seed: int, round_number: int) -> int:
    """A round's public sketch seed: the first 8 bytes, big-endian, of
    SHA-256("flora-sketch/v1/seed:<run seed>:<round>") (decimal), as a uint64."""
    digest = hashlib.sha256(f"{SEED_INFO}:{run_seed}:{round_number}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def omega_key(seed: int, module: str) -> bytes:
    """Step 1: the AES-256 key of one module's Omega stream."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"sketch seed {seed} is outside 0..2^64-1")
    info = OMEGA_INFO + module.encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed.to_bytes(8, "big"))


def uniforms(key: bytes, count: int) -> np.ndarray:
    """Steps 2 and 3: ``count`` uniforms in (0, 1) from the key's AES-256-CTR keystream."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8")
    return np.ldexp((words >> np.uint64(11)).astype(np.float64) + 0.5, -53)


def gaussians(key: bytes, count: int) -> np.ndarray:
    """Step 4: ``count`` standard normals, Box-Muller over consecutive pairs of uniforms."""
    u = uniforms(key, 2 * math.ceil(count / 2)).reshape(-1, 2)
    radius, angle = np.sqrt(-2.0 * np.log(u[:, 0])), 2.0 * math.pi * u[:, 1]
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)[:count]


def sketch_basis(d_in: int, columns: int, seed: int, module: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """Omega (d_in x m, orthonormal columns) of ``module`` for the sketch seed ``seed`` (module doc)."""
    if not 1 <= columns <= d_in:
        raise ValueError(f"sketch_basis: columns {columns} outside 1..d_in ({d_in})")
    gaussian = torch.from_numpy(gaussians(omega_key(seed, module), d_in * columns).reshape(d_in, columns))
    q, r = torch.linalg.qr(gaussian, mode="reduced")
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs).to(dtype)  # (d_in, m): R's diagonal made positive, Q's columns to match
