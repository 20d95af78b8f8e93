"""Client weights: by examples, uniform, or given; always validated to sum to 1."""

from __future__ import annotations

import pytest

from flora.common.weights import Weighting, client_weights


def test_examples_weighting_is_proportional_to_counts():
    assert client_weights([10, 30, 60]) == pytest.approx([0.1, 0.3, 0.6])


def test_uniform_weighting_ignores_counts():
    assert client_weights([1, 1000], Weighting.UNIFORM) == pytest.approx([0.5, 0.5])


def test_given_weights_are_checked_and_renormalised():
    assert client_weights([5, 5], "given", [0.25, 0.75]) == pytest.approx([0.25, 0.75])
    assert sum(client_weights([1, 1, 1], "given", [0.2, 0.3, 0.5 + 1e-9])) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(
    ("counts", "weighting", "given", "message"),
    [
        ([], "examples", None, "at least one client"),
        ([0, 0], "examples", None, "every client reported 0 examples"),
        ([-1, 3], "examples", None, "num_examples must be >= 0"),
        ([1, 1], "given", None, "expected 2 values"),
        ([1, 1], "given", [1.0], "expected 2 values"),
        ([1, 1], "given", [0.5, 0.6], "must sum to 1"),
        ([1, 1], "given", [1.5, -0.5], "finite and >= 0"),
        ([1, 1], "given", [float("nan"), 0.5], "finite and >= 0"),
    ],
)
def test_invalid_weights_are_rejected_with_a_reason(counts, weighting, given, message):
    with pytest.raises(ValueError, match=message):
        client_weights(counts, weighting, given)


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match="'size'"):
        client_weights([1], "size")
