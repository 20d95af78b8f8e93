"""Client weights p_k: how much each client's update counts in a round's aggregate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

# Weights are user input and floats: accept sums within this distance of 1, then renormalise.
_SUM_TOLERANCE = 1e-6


class Weighting(str, Enum):
    """How a round's client weights are chosen."""

    EXAMPLES = "examples"  # p_k = n_k / sum n_j (FedAvg's and the paper's default)
    UNIFORM = "uniform"  # p_k = 1 / K
    GIVEN = "given"  # user-supplied, one per client


def client_weights(
    num_examples: Sequence[int],
    weighting: Weighting | str = Weighting.EXAMPLES,
    given: Sequence[float] | None = None,
) -> list[float]:
    """The weights p_k of one round's K clients, validated to be non-negative and sum to 1."""
    weighting = Weighting(weighting)
    count = len(num_examples)
    if count == 0:
        raise ValueError("client weights: at least one client is required")
    if weighting is Weighting.UNIFORM:
        return [1.0 / count] * count
    if weighting is Weighting.EXAMPLES:
        if any(n < 0 for n in num_examples):
            raise ValueError(f"num_examples must be >= 0, got {list(num_examples)}")
        total = sum(num_examples)
        if total == 0:
            raise ValueError("num_examples: every client reported 0 examples; weights by examples are undefined")
        return [n / total for n in num_examples]
    return validate_weights(given, count)


def validate_weights(given: Sequence[float] | None, count: int) -> list[float]:
    """Check user-given weights (one per client, finite, >= 0, summing to 1) and renormalise."""
    if given is None or len(given) != count:
        raise ValueError(f"weights: expected {count} values (one per client), got {None if given is None else len(given)}")
    if any(not math.isfinite(w) or w < 0 for w in given):
        raise ValueError(f"weights must be finite and >= 0, got {list(given)}")
    total = math.fsum(given)
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"weights must sum to 1 (within {_SUM_TOLERANCE}), got sum {total!r}")
    return [w / total for w in given]
