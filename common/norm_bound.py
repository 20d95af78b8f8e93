"""|s B A - s0 B0 A0|_F^2 from float32 products, with a proven bound on their rounding error.

Each upload's norm is checked against a limit (``flora.common.robust.change_norm_sq`` gives it
exactly, in float64). Exactness matters only near the limit, and the float64 copies and products
are most of what validating a large upload costs (bench/transport.py's 256 MiB payload: 0.5 of the
0.7 s). Here the products are float32 and the result is an interval that provably holds the exact
value, from the classical bound on a float32 dot product of length n,

    |fl(x^T y) - x^T y| <= gamma_n |x|^T |y|,   gamma_n = n u / (1 - n u),   u = 2^-24,

which holds for any summation order and with fused multiply-adds. With L = [B, B0] and
R = [s A; -s0 A0] (L = B, R = A and the scaling applied afterwards for a fresh start), the squared
norm |L R|_F^2 comes:

- through the Grams when k^2 <= d_out d_in (k the stacked rank): G_L = L^T L, G_R = R R^T and
  sum(G_L * G_R). The error is at most (g_out + g_in + g_out g_in) sum((|L|^T |L|) * (|R| |R|^T))
  and that sum is ||L| |R||_F^2 <= |L|_F^2 |R|_F^2 (the traces of the Grams, so no further pass
  over the factors);
- through the product P = L R otherwise: |fl(P) - P|_F <= g_k ||L| |R||_F <= g_k |L|_F |R|_F. The
  three sums of squares (|L|_F^2, |R|_F^2, |fl(P)|_F^2) are float32 per row, each within g_n of
  its exact value for a row of n entries, and float64 across rows: a float64 pass over factors
  of rank 37,449 cost as much as their product (bench/transport.py's 256 MiB payload: 0.07 of the
  0.12 s, against 0.012 s now).

Casting the start to float32 and scaling R in float32 round each input once more: two extra
terms in every gamma cover both. Products that underflow lose at most 2^-149 each, an absolute
term per dot product added to the bound. The final sums run in float64; the bound is doubled as a margin
for their own rounding. The interval is typically 1e-4 wide relative to |L|_F^2 |R|_F^2 for LoRA
shapes (d = 4096, k = 64); a decision whose interval straddles the limit is left to the exact
float64 computation. Overflow (entries near float32's 3.4e38) gives no interval at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flora.common.lora import LoraPair

UNIT_ROUNDOFF = 2.0**-24  # float32, round to nearest
_FLOAT64_UNIT_ROUNDOFF = 2.0**-53
_EXTRA_ROUNDINGS = 2  # the cast of the start to float32 and the scaling of R
SUBNORMAL = 2.0**-149  # a float32 product that underflows loses at most this much (absolute)
_CEILING_ROUNDINGS = 8  # the float64 squares, products and sums that combine the ceiling's four sums


@dataclass(frozen=True)
class Interval:
    """[low, high] holding an exact squared norm, and the float32 estimate inside it."""

    low: float
    estimate: float
    high: float

    def __add__(self, other: Interval) -> Interval:
        return Interval(self.low + other.low, self.estimate + other.estimate, self.high + other.high)


ZERO = Interval(0.0, 0.0, 0.0)


def change_norm_sq_interval(
    a: Tensor, b: Tensor, scaling: float, start: LoraPair | None = None, start_scaling: float = 1.0
) -> Interval | None:
    """An interval holding |s B A - s0 B0 A0|_F^2 (|s B A|_F^2 without a start), or None when the
    float32 products overflow (the caller then computes it exactly)."""
    if start is None:
        left, right, factor = _f32(b), _f32(a), scaling * scaling
    else:
        left = np.concatenate([_f32(b), _f32(start.b)], axis=1)  # (d_out, 2r)
        right = np.concatenate([_f32(a) * np.float32(scaling), _f32(start.a) * np.float32(-start_scaling)])
        factor = 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        interval = _interval(left, right)
    if interval is None:
        return None
    low, estimate, high = (value * factor for value in (interval.low, interval.estimate, interval.high))
    return Interval(low, estimate, high) if math.isfinite(high) else None


def change_norm_sq_ceiling(
    a: Tensor, b: Tensor, scaling: float, start: LoraPair | None = None, start_scaling: float = 1.0
) -> float:
    """An upper bound on |s B A - s0 B0 A0|_F^2 from sums of squares alone: |L R|_F <= |L|_F |R|_F
    (L, R as above), so |L|_F^2 = |B|_F^2 + |B0|_F^2 and |R|_F^2 = s^2 |A|_F^2 + s0^2 |A0|_F^2.

    One pass over the factors instead of their product: far from the limit (the default is 100x
    the base weights' norm, and a LoRA's change is a small fraction of them) this decides alone,
    at a quarter of the interval's cost on bench/transport.py's 256 MiB payload (0.019 against 0.071 s). It is loose by up
    to the square root of the rank, so near the limit the interval decides. Infinite when a
    float32 sum overflows.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        left, right = _sum_sq(_f32(b)).high, scaling * scaling * _sum_sq(_f32(a)).high
        if start is not None:
            left += _sum_sq(_f32(start.b)).high
            right += start_scaling * start_scaling * _sum_sq(_f32(start.a)).high
    ceiling = left * right * (1.0 + _gamma64(_CEILING_ROUNDINGS))
    return ceiling if math.isfinite(ceiling) else math.inf


def _interval(left: np.ndarray, right: np.ndarray) -> Interval | None:
    """The interval of |L R|_F^2 for float32 L (d_out, k) and R (k, d_in)."""
    (d_out, k), d_in = left.shape, right.shape[1]
    if k * k <= d_out * d_in:
        gram_l = (left.T @ left).astype(np.float64)  # (k, k)
        gram_r = (right @ right.T).astype(np.float64)  # (k, k)
        estimate = max(float(np.sum(gram_l * gram_r)), 0.0)  # cancellation can round it below 0
        g_l, g_r = _gamma(d_out + _EXTRA_ROUNDINGS), _gamma(d_in + _EXTRA_ROUNDINGS)
        tau_l, tau_r = d_out * SUBNORMAL, d_in * SUBNORMAL  # what underflow can lose per Gram entry
        # |L|_F^2 = tr(L^T L): each computed diagonal entry is within g G_ii + tau of its exact value
        trace_l = _at_most(float(np.trace(gram_l)) + k * tau_l, g_l)
        trace_r = _at_most(float(np.trace(gram_r)) + k * tau_r, g_r)
        bound = trace_l * trace_r
        error = ((g_l + g_r + g_l * g_r + _gamma64(k * k)) * bound
                 + (1.0 + g_r) * tau_l * k * trace_r + (1.0 + g_l) * tau_r * k * trace_l + k * k * tau_l * tau_r)
        low, high = max(estimate - 2.0 * error, 0.0), estimate + 2.0 * error
    else:
        bound = _sum_sq(left).high * _sum_sq(right).high
        product = _sum_sq(left @ right)  # of fl(P), (d_out, d_in)
        estimate = product.estimate
        error = _gamma(k + _EXTRA_ROUNDINGS) * math.sqrt(bound) + math.sqrt(d_out * d_in) * k * SUBNORMAL
        low = max(math.sqrt(product.low) - 2.0 * error, 0.0) ** 2
        high = (math.sqrt(product.high) + 2.0 * error) ** 2
    if not all(math.isfinite(v) for v in (estimate, bound, high)):
        return None
    return Interval(low, estimate, high)


def _f32(tensor: Tensor) -> np.ndarray:
    """A float32 numpy view (a copy only where the tensor is on another device or dtype)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


def _sum_sq(x: np.ndarray) -> Interval:
    """sum(x^2) of a float32 (m, n) array: float32 sums per row (a dot product of length n, within
    g_n of its exact value plus what n underflows lose), float64 across the m rows."""
    m, n = x.shape
    total = float(np.einsum("ij,ij->i", x, x).astype(np.float64).sum())
    g, g64, underflow = _gamma(n), _gamma64(m), m * n * SUBNORMAL
    low = max((total * (1.0 - g64) - underflow) / (1.0 + g), 0.0)
    high = _at_most(total * (1.0 + g64) + underflow, g)
    return Interval(low, total, high)


def _at_most(computed: float, g: float) -> float:
    """The largest exact nonnegative value a result computed within relative error ``g`` can have
    (unbounded once g >= 1: there the division would turn the bound negative)."""
    return computed / (1.0 - g) if g < 1.0 else math.inf


def _gamma(n: int) -> float:
    nu = n * UNIT_ROUNDOFF
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


def _gamma64(n: int) -> float:
    nu = n * _FLOAT64_UNIT_ROUNDOFF
    return nu / (1.0 - nu)
