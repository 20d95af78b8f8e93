"""merge_update_in_place: the server's merge of a downlink, module by module, bit for bit what
merged_update gives, and all modules or none."""

from __future__ import annotations

import pytest
import torch

from flora.common import merge
from flora.common.lora import LoraPair
from flora.common.merge import merge_update_in_place, merged_update

SHAPES = {"m.k": (24, 16), "m.q": (16, 16), "m.v": (8, 32)}


def weights_of(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in SHAPES.items()}


def update_of(seed: int = 1, dense: str | None = "m.v") -> dict:
    gen = torch.Generator().manual_seed(seed)
    update = {}
    for name, (d_out, d_in) in SHAPES.items():
        if name == dense:
            update[name] = torch.randn(d_out, d_in, generator=gen) * 0.1
        else:
            update[name] = LoraPair(torch.randn(3, d_in, generator=gen), torch.randn(d_out, 3, generator=gen) * 0.1)
    return update


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_in_place_gives_bit_for_bit_what_merged_update_gives(dtype: torch.dtype) -> None:
    weights, update = weights_of(dtype), update_of()
    expected = merged_update(weights, update)
    storage = {name: w.data_ptr() for name, w in weights.items()}
    merge_update_in_place(weights, update)
    for name in SHAPES:
        assert weights[name].dtype == dtype
        assert weights[name].data_ptr() == storage[name]  # the model's own tensors, changed in place
        assert torch.equal(weights[name], expected[name])


def test_the_normal_path_never_holds_every_merged_module_at_once(monkeypatch) -> None:
    def all_at_once(*args, **kwargs):
        raise AssertionError("merged_update computes every module before changing any")

    weights, update = weights_of(torch.float32), update_of()
    expected = merged_update(weights, update)
    monkeypatch.setattr(merge, "merged_update", all_at_once)
    merge_update_in_place(weights, update)
    assert all(torch.equal(weights[name], expected[name]) for name in SHAPES)


def test_a_result_the_bound_cannot_prove_is_still_merged_exactly() -> None:
    # Rows of b and columns of a that are orthogonal: the product is 0, its Cauchy-Schwarz bound
    # (1e19 x 1e20) past float32's range, so the merge takes the all-at-once path.
    weights = weights_of(torch.float32)
    a = torch.zeros(2, 16)
    a[1] = 1e20
    b = torch.zeros(16, 2)
    b[:, 0] = 1e19
    update = {"m.q": LoraPair(a, b)}
    assert not merge._proved_finite(weights["m.q"], update["m.q"], torch.float32)
    before = weights["m.q"].clone()
    merge_update_in_place(weights, update)
    assert torch.equal(weights["m.q"], before)  # W + 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_non_finite_module_refuses_the_whole_update_and_changes_nothing(dtype: torch.dtype) -> None:
    weights = weights_of(dtype)
    before = {name: w.clone() for name, w in weights.items()}
    update = update_of()
    # m.q (merged after m.k) overflows: 3e4 x 3e4 past float16's range, 1e20 x 1e20 past float32's.
    big = 3e4 if dtype == torch.float16 else 1e20
    update["m.q"] = LoraPair(torch.full((1, 16), big), torch.full((16, 1), big))
    with pytest.raises(ValueError, match="module 'm.q': merging the adapter gives non-finite weights"):
        merge_update_in_place(weights, update)
    assert all(torch.equal(weights[name], before[name]) for name in SHAPES)


def test_non_finite_factors_or_weights_are_never_proved_finite() -> None:
    weight = torch.ones(4, 4)
    pair = LoraPair(torch.ones(1, 4), torch.ones(4, 1))
    assert merge._proved_finite(weight, pair, torch.float32)
    assert not merge._proved_finite(weight, LoraPair(torch.full((1, 4), float("nan")), torch.ones(4, 1)), torch.float32)
    assert not merge._proved_finite(weight, torch.full((4, 4), float("inf")), torch.float32)
    nan_weight = weight.clone()
    nan_weight[3, 3] = float("nan")
    assert not merge._proved_finite(nan_weight, pair, torch.float32)


def test_a_shape_or_name_mismatch_is_refused_before_any_module_changes() -> None:
    weights = weights_of(torch.float32)
    before = {name: w.clone() for name, w in weights.items()}
    wrong = update_of()
    wrong["m.v"] = torch.zeros(8, 31)
    with pytest.raises(ValueError, match=r"module 'm.v': adapter delta is \(8, 31\) but the weight is \(8, 32\)"):
        merge_update_in_place(weights, wrong)
    missing = {**update_of(), "m.o": torch.zeros(2, 2)}
    with pytest.raises(KeyError, match="m.o"):
        merge_update_in_place(weights, missing)
    assert all(torch.equal(weights[name], before[name]) for name in SHAPES)
