"""The two-pass randomized range finder: a sum of low-rank changes from two sums of projections.

Secure aggregation (issue 30) and the private release (issue 31) both need the round's update
sum_k D_k without anyone holding a single D_k, and both can only add things up. A sum of
projections suffices (Halko, Martinsson, Tropp 2011, algorithm 4.1, without power iterations):

    pass 1:  Y = sum_k D_k Omega            Omega: d_in x m with orthonormal columns
             Q = orth(Y)                     d_out x m
    pass 2:  P = sum_k D_k^T Q               d_in x m
    result:  Q P^T = Q Q^T sum_k D_k

The result equals sum_k D_k exactly (to round-off) when m is at least the dimension of the span
of the D_k's ranges, because then Y spans it for any Omega in general position: a bound the
server knows from the clients' ranks alone (``rank_bound``, ``sketch_width``). Omega
(``flora.common.omega``: public, from the round's seed) has orthonormal columns, which
keep every client's contribution no larger than its change, |D_k Omega|_F <= |D_k|_F, and Q's
keep |D_k^T Q|_F <= |D_k|_F: the sensitivity bound a private release needs. A change is given
either dense (d_out x d_in) or as factors (b: d_out x r, a: r x d_in, D = b a); with factors
no dense matrix is ever formed.

Pure functions; the caller decides who sums what, and whether noise or masks are added between.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flora.common.lora import LoraPair

OVERSAMPLE = 4  # extra columns: a rank bound met with equality leaves no margin for round-off

Change = LoraPair | Tensor  # factors (a: r x d_in, b: d_out x r) or a dense d_out x d_in matrix


def sketch_columns(rank_bound: int, d_out: int, d_in: int, oversample: int = OVERSAMPLE) -> int:
    """Columns m of the sketch of a module whose summed change has rank at most ``rank_bound``
    (the sum of the clients' ranks for fresh starts, plus the largest start's rank for warm
    starts), never more than the matrix has: at m = min(d_out, d_in) the result is exact for any
    change."""
    if rank_bound < 1 or d_out < 1 or d_in < 1 or oversample < 0:
        raise ValueError(f"sketch_columns: rank_bound {rank_bound}, shape ({d_out}, {d_in}), oversample {oversample}")
    return min(rank_bound + oversample, d_out, d_in)


def prefers_dense(d_out: int, d_in: int, columns: int) -> bool:
    """True when one pass of the dense change moves fewer numbers than two passes of m columns
    (2 m (d_out + d_in) > d_out d_in, issue 30): small modules and large rank bounds. Always
    true at m = min(d_out, d_in), where a sketch would gain nothing."""
    return 2 * columns * (d_out + d_in) > d_out * d_in


def rank_bound(ranks: Sequence[int], start_ranks: Sequence[int]) -> int:
    """A bound on the rank of sum_k (s_k B_k A_k - init_k): the sum of the clients' ranks, plus
    the largest start's rank (``start_ranks``: those of the warm starts, none for fresh ones):
    the warm methods' starts are truncations of one global LoRA, so their ranges nest."""
    return sum(ranks) + max(start_ranks, default=0)


def sketch_width(rank_bound: int, d_out: int, d_in: int) -> int:
    """One module's m in a round whose change has rank at most ``rank_bound``, or 0 when the
    module is better released dense (``prefers_dense``). The one rule of the secure plan and the
    private release: a dense module moves fewer numbers, and under DP it also carries less noise
    (d_out d_in noisy entries against 2 m (d_out + d_in))."""
    columns = sketch_columns(rank_bound, d_out, d_in)
    return 0 if prefers_dense(d_out, d_in, columns) else columns


def project_columns(change: Change, omega: Tensor) -> Tensor:
    """Pass 1's term D Omega (d_out x m), from factors as b (a Omega)."""
    if isinstance(change, LoraPair):
        return change.b.to(omega.dtype) @ (change.a.to(omega.dtype) @ omega)
    return change.to(omega.dtype) @ omega


def project_rows(change: Change, q: Tensor) -> Tensor:
    """Pass 2's term D^T Q (d_in x m), from factors as a^T (b^T Q)."""
    if isinstance(change, LoraPair):
        return change.a.to(q.dtype).T @ (change.b.to(q.dtype).T @ q)
    return change.to(q.dtype).T @ q


def range_basis(y: Tensor) -> Tensor:
    """Q: orthonormal columns spanning Y's range (reduced QR; with a rank-deficient Y the extra
    columns are still orthonormal, so they cost bytes, never exactness)."""
    return torch.linalg.qr(y, mode="reduced").Q  # (d_out, m)


def broadcast_basis(q: Tensor) -> Tensor:
    """Q as it is broadcast between the passes: rounded to float32 (half the bytes of float64 on
    the wire), held as float64 values, the very numbers every client computes pass 2 with. Its
    span differs from Q's by about float32's epsilon; ``assemble`` undoes that exactly."""
    return q.to(torch.float32).to(torch.float64)


def assemble(q: Tensor, p: Tensor, sent: Tensor | None = None) -> LoraPair:
    """The result as LoRA factors of rank m (b = Q), for the downlink to refactor, from P computed
    with ``sent`` (default Q itself): P^T = sent^T D, and D = Q Q^T D because D's range lies in
    Q's span, so Q^T D = (sent^T Q)^-1 P^T and a is that. For the float32 broadcast Q
    (``broadcast_basis``) sent^T Q is the identity to float32's precision, and the solve takes the
    rounding out exactly: the result is D to float64 round-off, as with Q sent in float64 (where
    it is P^T)."""
    sent = q if sent is None else sent
    return LoraPair(a=torch.linalg.solve(sent.T @ q, p.T.to(q.dtype)).contiguous(), b=q)
