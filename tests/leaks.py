"""Is one client's clear value recoverable from arrays or bytes the server kept? (issue 30, Tests)

The secure server may hold masked vectors (uniform noise to anyone without the masks) and sums
over the round's survivors. ``leaks`` compares every held array with every client's clear
values by correlation: a held array (or a row of one, in case several were stacked) that
correlates with a client's value beyond chance, and is not one of the allowed sums, is a leak.
``byte_leaks`` looks for a clear value's exact encodings (float32, float64, fixed point) in raw
bytes: database pages, logs, any file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

SUM_CORRELATION = 0.99  # an allowed sum (or Q, or the round's change) matches at least this well
STACKED_AT_MOST = 16  # a held array is also read as rows of a clear value's length, up to this many


def chance_bound(length: int) -> float:
    """|corr| of independent vectors of ``length`` entries stays below this everywhere (7 sigma,
    never below 0.1): a correlation above it means a held array carries the clear value."""
    return max(0.1, 7.0 / math.sqrt(length))


def as_values(array: np.ndarray) -> np.ndarray:
    """An array's entries as float64, uint64 read as two's complement (fixed point, masked or not)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype == np.uint64:
        flat = flat.view(np.int64)
    return flat.astype(np.float64)


def _standardized(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centred = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    usable = norms > 0
    return centred[usable] / norms[usable, None], usable


@dataclass(frozen=True)
class Leak:
    held: str
    value: str
    correlation: float


def leaks(held: Mapping[str, np.ndarray], clear: Mapping[str, np.ndarray], allowed: Iterable[np.ndarray]) -> list[Leak]:
    """Each held array (or row) that correlates with a clear value beyond chance and is no allowed
    sum (nor a row or column of one: Q, P^T and the downlink's factors are made of them)."""
    by_length: dict[int, list[tuple[str, np.ndarray]]] = {}
    for name, value in clear.items():
        by_length.setdefault(value.size, []).append((name, as_values(value)))
    sums: dict[int, list[np.ndarray]] = {}
    for value in allowed:  # a matrix's rows and columns too: a factorization of a sum holds them
        for part in (value, *(value if value.ndim == 2 else ()), *(value.T if value.ndim == 2 else ())):
            sums.setdefault(part.size, []).append(as_values(part))
    found = []
    for held_name, array in held.items():
        values = as_values(array)
        for length, named in by_length.items():
            if values.size % length or values.size // length > STACKED_AT_MOST:
                continue
            rows, usable = _standardized(values.reshape(-1, length))
            if not len(rows):
                continue
            clear_rows, _ = _standardized(np.stack([v for _, v in named]))
            correlation = np.abs(rows @ clear_rows.T)  # (held rows, clear values)
            if length in sums:
                sum_rows, _ = _standardized(np.stack(sums[length]))
                is_sum = np.abs(rows @ sum_rows.T).max(axis=1) >= SUM_CORRELATION
                correlation[is_sum] = 0.0
            for row, column in zip(*np.nonzero(correlation > chance_bound(length))):
                found.append(Leak(held_name, named[column][0], float(correlation[row, column])))
    return found


def holds_a_sum(held: Mapping[str, np.ndarray], total: np.ndarray) -> bool:
    """Whether some held array is ``total`` (to the allowed correlation): the scan saw the sums."""
    want, _ = _standardized(as_values(total)[None, :])
    for array in held.values():
        values = as_values(array)
        if values.size == total.size:
            row, usable = _standardized(values[None, :])
            if len(row) and abs(float(row[0] @ want[0])) >= SUM_CORRELATION:
                return True
    return False


def encodings(value: np.ndarray, bits: int, entries: int = 4) -> dict[str, bytes]:
    """The first ``entries`` values of a clear vector as the bytes a careless server would store."""
    head = as_values(value)[:entries]
    return {"float32": head.astype("<f4").tobytes(), "float64": head.astype("<f8").tobytes(),
            "fixed point": np.round(np.ldexp(head, bits)).astype("<i8").tobytes()}


def byte_leaks(blob: bytes, clear: Mapping[str, np.ndarray], bits: int) -> list[str]:
    """The clear values whose leading entries appear in ``blob`` in one of their encodings."""
    return [f"{name} as {kind}" for name, value in clear.items() if np.any(as_values(value)[:4] != 0)
            for kind, needle in encodings(value, bits).items() if needle in blob]
