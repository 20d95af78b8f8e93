"""Fixed point over the integers mod 2^64: what masked vectors are made of, and what the sum may be.

Pairwise masks cancel only in exact arithmetic, so every uploaded number is an integer mod 2^64:
a value x becomes round(x 2^f) (to nearest, ties to even) in two's complement, and a summed
vector is read back as a signed 64-bit integer times 2^-f. The scale 2^f is one number the run
spec announces; ``choose_scale`` derives it from two things the server knows:

- the bound B on any one contribution (each client clips its weighted change to Frobenius norm
  <= B before masking, so every entry has |x| <= B), and
- the number of clients K whose vectors are summed.

The arithmetic, with every rounding counted (each encoded entry is off by at most 1/2):

- no wrap:   |sum_k round(x_k 2^f)| <= K (B 2^f + 1/2) <= 2^62. That is one bit below the 2^63 a
  signed sum could reach, kept as headroom: an honest sum cannot leave [-2^62, 2^62], so a sum
  that does (a client that skipped its clipping, up to twice the bound) is seen as out of range
  instead of wrapping into a plausible value. The largest f that meets this is chosen: it gives
  the finest resolution.
- resolution: the decoded sum is off by at most K 2^-(f+1) in each entry. That must not exceed
  float32's round-off of a value at the bound, 2^-24 B, or the sum would be less exact than the
  plain float32 aggregation it replaces.

Substituting the largest f into the second: 2^f lies in (R / 2, R] for R = (2^62 / K - 1/2) / B,
so every bound has a scale when K^2 < 2^38 (up to 524,287 clients, ``max_clients``) and none
when K^2 > 2^39 (about 741,000); in between it depends on where R falls between two powers of
2. Where no scale meets both, or for a bound that is not a positive finite number,
``choose_scale`` refuses. The resolution is absolute, K B 2^-63 or so: a clip bound far above
the changes' actual norms (say 10^6 times) spends that many of the 62 bits on range nobody uses,
so the bound should be set near the norms, as clipping wants anyway. Pure functions over numpy arrays; no masking here (that is
``flora.common.secagg``'s crypto layer).
"""

from __future__ import annotations

import math

import numpy as np

HEADROOM_BITS = 62  # honest sums stay within +-2^62 (see the module docstring)
FLOAT32_ROUNDOFF = 2.0**-24  # unit round-off of float32: half the spacing of floats at 1.0


def choose_scale(bound: float, clients: int) -> int:
    """The fractional bits f of the run's fixed point: the largest f whose sum of ``clients``
    contributions, each entry at most ``bound`` in magnitude, cannot wrap, provided its
    resolution is below float32 round-off at the bound (module docstring); else a ValueError."""
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"secure aggregation: bound must be a positive finite number, got {bound}")
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"secure aggregation: clients must be an integer >= 1, got {clients!r}")
    # K (B 2^f + 1/2) <= 2^62  <=>  2^f <= (2^62 / K - 1/2) / B
    room = (2.0**HEADROOM_BITS / clients - 0.5) / bound
    if not math.isfinite(room):  # 2^f beyond float64: decoding at 2^-f would underflow
        raise ValueError(f"secure aggregation: bound {bound:g} is too small for a fixed-point scale (float64 cannot "
                         f"hold 2^62 / (clients x bound)); clip to a larger norm")
    bits = math.floor(math.log2(room))
    while clients * (math.ldexp(bound, bits) + 0.5) > 2.0**HEADROOM_BITS:  # log2's own rounding
        bits -= 1
    if clients * math.ldexp(0.5, -bits) > FLOAT32_ROUNDOFF * bound:
        raise ValueError(
            f"secure aggregation: clients {clients} too many for one fixed-point sum: at bound {bound:g} "
            f"the finest scale that cannot wrap (2^{bits}) resolves only {clients * math.ldexp(0.5, -bits):.3g}, "
            f"coarser than float32 round-off at the bound ({FLOAT32_ROUNDOFF * bound:.3g}); at most "
            f"{max_clients():,} clients fit at any bound"
        )
    return bits


def max_clients() -> int:
    """The most clients one fixed-point sum holds at every bound: K^2 < 2^38 (module docstring;
    floor(log2 R) may cost one bit of the 2^39 the best case allows)."""
    return math.isqrt(2**(HEADROOM_BITS - 24) - 1)


def encode(values: np.ndarray, bits: int) -> np.ndarray:
    """round(x 2^bits) mod 2^64 of every value, flattened in row-major order: a uint64 vector.

    Refuses (ValueError) a value that is not finite or whose integer would leave +-2^62: a
    client whose contribution exceeds the announced bound must not upload it. The message names
    the range only, never the value: the server also encodes a noiseless sum (the survivors' sum
    rescaled), which under differential privacy nothing may publish.
    """
    flat = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ValueError("secure aggregation: value must be finite to encode, got NaN or infinity")
    scaled = np.rint(np.ldexp(flat, bits))
    if scaled.size and np.max(np.abs(scaled)) > 2.0**HEADROOM_BITS:
        raise ValueError(f"secure aggregation: a value exceeds the fixed-point range +-2^{HEADROOM_BITS - bits} "
                         f"of scale 2^{bits}")
    return scaled.astype(np.int64).view(np.uint64)


def decode(summed: np.ndarray, bits: int) -> np.ndarray:
    """A uint64 vector (a sum mod 2^64) read as signed integers times 2^-bits, in float64."""
    signed = np.ascontiguousarray(summed, dtype=np.uint64).view(np.int64)
    return np.ldexp(signed.astype(np.float64), -bits)


def resolution(bits: int, clients: int) -> float:
    """The most a decoded sum of ``clients`` encoded vectors differs from the exact sum, per entry."""
    return clients * math.ldexp(0.5, -bits)


def check_sum(total: np.ndarray, norm_bound: float, bits: int, clients: int, private: bool = False) -> None:
    """Refuse (ValueError) a decoded sum outside the announced range: an entry beyond +-2^62 2^-f
    (where no honest sum reaches) or a Frobenius norm above ``norm_bound`` (the sum of the
    clients' bounds) by more than the fixed point's own rounding. What the server can still check
    when it never sees a single contribution. ``private`` (under differential privacy the sum is
    the noiseless one, which nothing may publish): the message names the check and its limit only,
    nothing computed from the sum (it reaches the log and the history's exclusion reasons)."""
    limit = math.ldexp(1.0, HEADROOM_BITS - bits)
    if total.size and float(np.max(np.abs(total))) > limit:
        value = "" if private else f" {float(np.max(np.abs(total))):.6g}"
        raise ValueError(f"secure aggregation: sum entry{value} outside the announced range +-{limit:.6g} "
                         "(a contribution above the bound, or a wrong scale)")
    norm = float(np.linalg.norm(total))
    allowed = norm_bound + math.sqrt(total.size) * resolution(bits, clients)
    if not norm <= allowed:
        value = "" if private else f" {norm:.6g}"
        raise ValueError(f"secure aggregation: sum norm{value} exceeds the announced bound {allowed:.6g}")


def wrapping_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """The plain sum mod 2^64 of uint64 vectors (what unmasking yields, without the masks)."""
    if not vectors:
        raise ValueError("secure aggregation: nothing to sum")
    total = np.zeros_like(vectors[0], dtype=np.uint64)
    for vector in vectors:
        np.add(total, vector, out=total)  # uint64 addition wraps mod 2^64, as the masks need
    return total
