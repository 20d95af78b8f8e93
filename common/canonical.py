"""Canonical factors of an aggregate: the one factorization of B A that depends on the product alone.

A stacked global adapter (``flora_stack``) hands every reader every client's factors, cut out by
row ranges. The same update B A (d_out x d_in) also has a factorization that is a function of the
product only, its thin SVD U S V^T, split evenly between the two sides:

    b' = U sqrt(S)     (d_out, rho)
    a' = sqrt(S) V^T   (rho, d_in)        b' a' = U S V^T = B A

Two different sets of client updates with the same weighted sum give the same b', a' (up to
round-off), so a client that receives them learns the sum and nothing else (DESIGN.md section 6).
By Eckart-Young the leading k columns of b' and rows of a' are the best rank-k approximation of
the update in Frobenius and spectral norm: the energy-threshold compression and the warm-started
methods both rely on that.

The SVD never forms the dense product when the stack is thin: with the thin QR factorizations
B = Q_b R_b and A^T = Q_a R_a, B A = Q_b (R_b R_a^T) Q_a^T, so an SVD of the small core
R_b R_a^T (at most R x R) gives U = Q_b U_c and V = Q_a V_c. The cost is
O((d_out + d_in) R^2 + R^3) per module rather than O(d_out d_in min(d_out, d_in)).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from flora.common.lora import LoraPair


def canonical_pair(
    pair: LoraPair, dtype: torch.dtype = torch.float64, out_dtype: torch.dtype = torch.float32
) -> LoraPair:
    """The canonical factors b' = U sqrt(S), a' = sqrt(S) V^T of the update ``pair.b @ pair.a``.

    ``pair`` is a stacked module (a: (R, d_in), b: (d_out, R)) with every scaling already folded
    in, so that B A is the whole update. The result has:

    - singular values in descending order (row i of a' and column i of b' both have norm
      sqrt(S_i); ``singular_values`` reads them back);
    - a fixed sign convention: in each column of b' the entry of largest magnitude is positive
      (the first such entry on a tie), which makes the factors unique for distinct singular values;
    - rank rho <= min(R, d_out, d_in), cut where a singular value falls to or below
      ``rank_tolerance`` times the largest, i.e. below what float round-off of the returned
      factors can resolve;
    - the leading k rows of a' and columns of b' form the best rank-k approximation of B A
      (Eckart-Young), for every k <= rho.

    A zero update keeps rank 1 with zero factors, so that every module still has a (d_out, 1)
    and (1, d_in) pair to merge. ``dtype`` is the arithmetic precision (float64 by default: the
    core's small singular values need it), ``out_dtype`` that of the result.
    """
    a, b = pair
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"canonical_pair: a {tuple(a.shape)} and b {tuple(b.shape)} are not (R, d_in) and (d_out, R)")
    with _one_thread():
        u, s, vh = _thin_svd(a.to(dtype), b.to(dtype))
    keep = int((s > s[0] * rank_tolerance(s.numel(), dtype, out_dtype)).sum()) if s.numel() else 0
    if keep == 0:
        d_out, d_in = b.shape[0], a.shape[1]
        return LoraPair(a.new_zeros(1, d_in, dtype=out_dtype), b.new_zeros(d_out, 1, dtype=out_dtype))
    u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    signs = _column_signs(u)
    root = s.sqrt()
    return LoraPair(
        (vh * (root * signs)[:, None]).to(out_dtype),  # (rho, d_in)
        (u * (root * signs)[None, :]).to(out_dtype),  # (d_out, rho)
    )


def rank_tolerance(size: int, dtype: torch.dtype, out_dtype: torch.dtype) -> float:
    """Singular values at or below this fraction of the largest are round-off, and are cut.

    Rounding each factor of a rank-rho result to ``out_dtype`` moves the product by about
    eps * sqrt(rho) * s_max in spectral norm, so smaller singular values cannot be told apart
    from the rounding of the larger ones; the coarser of the two precisions sets eps.
    """
    eps = max(torch.finfo(dtype).eps, torch.finfo(out_dtype).eps)
    return eps * math.sqrt(max(size, 1))


def singular_values(pair: LoraPair) -> Tensor:
    """The singular values S of a canonical pair: |row i of a'| * |column i of b'| (= S_i)."""
    return torch.linalg.vector_norm(pair.a.double(), dim=1) * torch.linalg.vector_norm(pair.b.double(), dim=0)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run LAPACK's QR and SVD on one thread, as fast as two on a quiet machine and never stalled.

    Measured at 4096 x 744 (bench/aggregate.py, 2 cores shared with other work): the threaded
    SVD of a 744 x 744 core took 4.5 s against 0.36 s on one thread (its many small synchronised
    steps wait on a busy second core), and the whole factorization 3.9 s against 1.1 s.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _thin_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U (d_out, m), S (m,), V^T (m, d_in) of B A through QR of B and A^T and an SVD of the core."""
    q_b, r_b = torch.linalg.qr(b)  # (d_out, m1), (m1, R)
    q_a, r_a = torch.linalg.qr(a.T)  # (d_in, m2), (m2, R)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (m1, m2)
    return q_b @ u_c, s, vh_c @ q_a.T


def _column_signs(u: Tensor) -> Tensor:
    """+1 or -1 per column, so that each column's entry of largest magnitude becomes positive."""
    pivots = u.abs().argmax(dim=0)  # argmax returns the first index of the maximum on a tie
    signs = torch.sign(u.gather(0, pivots[None, :])).squeeze(0)
    return torch.where(signs == 0, torch.ones_like(signs), signs)
