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

Two ways to the triangular factors R_b, R_a, chosen per module:

- Cholesky of the Gram matrices B^T B and A A^T (CholeskyQR, never forming Q): about 8 d R^2
  flops, all matrix products, which is what a stack of independent clients gets. Its Q loses
  orthogonality as eps cond(B)^2, so it is taken only when the factors are well conditioned, and
  its result is checked. The core's singular vectors then come from a symmetric eigensolver on
  C^T C (C = R_b R_a^T), about 3x faster than an SVD of C, whenever C's spectrum is narrow enough
  for the squared one to keep full accuracy; U = B R_a^T V_c S^-1 then needs no triangular solve
  on the B side. A wide spectrum takes the SVD of C;
- Householder QR otherwise (about 12 d R^2 flops, slower per flop): backward stable for any
  stack, rank-deficient or cancelling (flora-warm's change: each client's trained factors next to
  the nearly equal ones it started from).
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


def product_norm(pair: LoraPair) -> float:
    """|B A|_F in float64 from the factors: the Frobenius norm of the triangular core R_b R_a^T.

    Householder QR is backward stable, so the norm is accurate relative to |B| |A| even where the
    product cancels (the difference between a round's merged update and its exact target, which
    is what ``round_error`` measures); Gram matrices would lose it to cancellation. The dense
    product is taken where it is the cheaper form (R (d_out + d_in) >= d_out d_in).
    """
    a, b = pair.a.double(), pair.b.double()
    if a.shape[0] * (b.shape[0] + a.shape[1]) >= b.shape[0] * a.shape[1]:
        return float(torch.linalg.matrix_norm(b @ a))
    with _one_thread():
        r_b = torch.linalg.qr(b, mode="r").R  # (m1, R)
        r_a = torch.linalg.qr(a.T, mode="r").R  # (m2, R)
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


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
    """U (d_out, m), S (m,), V^T (m, d_in) of B A: CholeskyQR when it is accurate, else Householder."""
    return _cholesky_svd(a, b) or householder_svd(a, b)


def householder_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD through Householder QR of B and A^T and an SVD of the core: backward stable for
    any stack, the path `_thin_svd` falls back to (and bench.aggregate's baseline)."""
    with _one_thread():
        q_b, r_b = torch.linalg.qr(b)  # (d_out, m1), (m1, R)
        q_a, r_a = torch.linalg.qr(a.T)  # (d_in, m2), (m2, R)
        u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (m1, m2)
    return q_b @ u_c, s, vh_c @ q_a.T


# CholeskyQR's Q is orthonormal to about eps * cond^2; with cond(B) below 1e3 in float64 that is
# 1e-10, far inside what the float32 factors resolve. The diagonal of the Cholesky factor bounds
# cond from below (sigma_min <= |r_ii| <= sigma_max), so the screen can pass a worse stack: the
# orthogonality of the result is then measured on a probe vector and must be within the budget.
CHOLESKY_MAX_DIAGONAL_RATIO = 1e3
CHOLESKY_MAX_ORTHOGONALITY_ERROR = 1e-9


def _cholesky_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """The thin SVD through Cholesky factors of the Gram matrices; None where it would not be exact.

    With R_b^T R_b = B^T B and R_a^T R_a = A A^T, Q_b = B R_b^-1 and Q_a = A^T R_a^-1, so B A =
    Q_b C Q_a^T with the core C = R_b R_a^T: two Gram products and two thin products, all BLAS-3
    (threaded), plus O(R^3) work on the core. Only for a thin stack (R <= d_out, d_in); a
    rank-deficient or ill-conditioned factor, or a result whose U or V is not orthonormal to the
    budget, returns None and the caller takes Householder QR.
    """
    rank = a.shape[0]
    if rank > min(a.shape[1], b.shape[0]):
        return None
    r_b, r_a = _gram_root(b), _gram_root(a.T)
    if r_b is None or r_a is None:
        return None
    core = r_b @ r_a.T
    return _checked(_core_eigh(a, b, core, r_a)) or _checked(_core_svd(a, b, core, r_b, r_a))


# An eigenvalue of C^T C is resolved to about eps * lambda_max, so U's columns lose orthogonality
# as eps * lambda_max / lambda_i: below this ratio the core's SVD is taken instead (the
# orthogonality check would refuse most such results anyway, after the thin products).
EIGH_MIN_EIGENVALUE_RATIO = 1e-6


def _core_eigh(a: Tensor, b: Tensor, core: Tensor, r_a: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """U, S, V^T from the eigenvectors V_c of C^T C, or None when its spectrum is too wide.

    C = U_c S V_c^T gives U_c = C V_c S^-1, so U = Q_b U_c = B R_b^-1 R_b R_a^T V_c S^-1 =
    B (R_a^T V_c S^-1), and V^T = V_c^T Q_a^T = (R_a^-1 V_c)^T A.
    """
    with _one_thread():
        eigenvalues, v_c = torch.linalg.eigh(core.T @ core)  # ascending
    eigenvalues, v_c = eigenvalues.flip(0), v_c.flip(1)
    if not eigenvalues[-1] >= eigenvalues[0] * EIGH_MIN_EIGENVALUE_RATIO:  # also refuses NaN
        return None
    s = eigenvalues.sqrt()
    u = b @ (r_a.T @ (v_c / s[None, :]))
    vh = torch.linalg.solve_triangular(r_a, v_c, upper=True).T @ a
    return u, s, vh


def _core_svd(
    a: Tensor, b: Tensor, core: Tensor, r_b: Tensor, r_a: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """U, S, V^T from an SVD of the core: U = B (R_b^-1 U_c), V^T = (R_a^-1 V_c)^T A (any spectrum)."""
    with _one_thread():
        u_c, s, vh_c = torch.linalg.svd(core)
    u = b @ torch.linalg.solve_triangular(r_b, u_c, upper=True)
    vh = torch.linalg.solve_triangular(r_a, vh_c.T, upper=True).T @ a
    return u, s, vh


def _checked(result: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """The result, unless its U or V is further from orthonormal than the budget."""
    if result is None:
        return None
    u, _, vh = result
    if max(_orthogonality_error(u), _orthogonality_error(vh.T)) > CHOLESKY_MAX_ORTHOGONALITY_ERROR:
        return None
    return result


def _gram_root(x: Tensor) -> Tensor | None:
    """Upper-triangular R with R^T R = X^T X, or None when X is too ill-conditioned for it."""
    factor, info = torch.linalg.cholesky_ex(x.T @ x, upper=True)
    if int(info) != 0:
        return None
    diagonal = factor.diagonal().abs()
    if not diagonal.min() * CHOLESKY_MAX_DIAGONAL_RATIO >= diagonal.max():  # also refuses NaN
        return None
    return factor


def _orthogonality_error(q: Tensor) -> float:
    """|Q^T Q g - g| / |g| for a fixed random g: how far Q's columns are from orthonormal."""
    probe = torch.randn(q.shape[1], 1, dtype=q.dtype, generator=torch.Generator().manual_seed(0))
    return float(torch.linalg.vector_norm(q.T @ (q @ probe) - probe) / torch.linalg.vector_norm(probe))


def _column_signs(u: Tensor) -> Tensor:
    """+1 or -1 per column, so that each column's entry of largest magnitude becomes positive."""
    pivots = u.abs().argmax(dim=0)  # argmax returns the first index of the maximum on a tie
    signs = torch.sign(u.gather(0, pivots[None, :])).squeeze(0)
    return torch.where(signs == 0, torch.ones_like(signs), signs)
