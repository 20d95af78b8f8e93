"""The algebra of aggregating client LoRA updates: FLoRA stacking and the fedit / zeropad averages.

The methods built on it (what a run merges and keeps) are in ``flora.common.methods``.

Pure functions from tensors to tensors (DESIGN.md section 2). Every client update is a
``LoraAdapter`` carrying its own scaling s_k, and the weights p_k come from
``flora.common.weights``. Arithmetic happens in float32 (float64 on request) whatever dtype the
factors arrived in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from flora.common.lora import LoraAdapter, LoraPair, pad_pair


def check_compatible(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> None:
    """Require one weight per adapter and the same modules, with the same shapes, in each."""
    if not adapters:
        raise ValueError("aggregation needs at least one client update")
    if len(weights) != len(adapters):
        raise ValueError(f"aggregation: {len(adapters)} updates but {len(weights)} weights")
    first = adapters[0]
    for k, adapter in enumerate(adapters[1:], start=1):
        if set(adapter.pairs) != set(first.pairs):
            extra = sorted(set(adapter.pairs) ^ set(first.pairs))[0]
            raise ValueError(f"update {k}: module set differs from update 0 (e.g. {extra!r})")
        for name, pair in adapter.pairs.items():
            ref = first.pairs[name]
            if pair.a.shape[1] != ref.a.shape[1] or pair.b.shape[0] != ref.b.shape[0]:
                raise ValueError(
                    f"update {k}, module {name!r}: (d_out, d_in) = {(pair.b.shape[0], pair.a.shape[1])} "
                    f"differs from update 0's {(ref.b.shape[0], ref.a.shape[1])}"
                )


def flora_stack(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], dtype: torch.dtype = torch.float32
) -> LoraAdapter:
    """FLoRA: stack along the rank axis so that B_g A_g = sum_k p_k s_k B_k A_k exactly.

    Each client's weight and scaling are folded into its rows of A_g, so the global adapter has
    scaling 1 and rank R = sum r_k, and any mix of ranks, alphas and rsLoRA is exact.
    """
    check_compatible(adapters, weights)
    total = sum(adapter.rank for adapter in adapters)
    pairs = {}
    for name in adapters[0].module_names:
        first = adapters[0].pairs[name]
        device = first.a.device
        a_g = torch.empty(total, first.a.shape[1], dtype=dtype, device=device)  # (R, d_in)
        b_g = torch.empty(first.b.shape[0], total, dtype=dtype, device=device)  # (d_out, R)
        row = 0
        for adapter, p in zip(adapters, weights):  # written in place: one pass, no temporaries
            a, b = adapter.pairs[name]
            torch.mul(a.to(dtype), p * adapter.scaling, out=a_g[row : row + adapter.rank])
            b_g[:, row : row + adapter.rank].copy_(b)
            row += adapter.rank
        pairs[name] = LoraPair(a_g, b_g)
    return LoraAdapter(pairs, scaling=1.0)


def _common_scaling(adapters: Sequence[LoraAdapter], method: str) -> float:
    """The one scaling averaging methods need: averaging factors of different scalings is wrong."""
    scaling = adapters[0].scaling
    for k, adapter in enumerate(adapters):
        if not math.isclose(adapter.scaling, scaling, rel_tol=1e-6):
            raise ValueError(
                f"{method} requires every client to use the same LoRA scaling; "
                f"update {k} has {adapter.scaling:g}, update 0 has {scaling:g}"
            )
    return scaling


def _average(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], rank: int, scaling: float, dtype: torch.dtype
) -> LoraAdapter:
    """A_g = sum p_k A_k, B_g = sum p_k B_k, each factor zero-padded to ``rank`` first."""
    pairs = {}
    for name in adapters[0].module_names:
        padded = [pad_pair(LoraPair(*(t.to(dtype) for t in a.pairs[name])), rank) for a in adapters]
        pairs[name] = LoraPair(
            sum(p * pair.a for p, pair in zip(weights, padded)),
            sum(p * pair.b for p, pair in zip(weights, padded)),
        )
    return LoraAdapter(pairs, scaling=scaling)


def fedit_average(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], dtype: torch.dtype = torch.float32
) -> LoraAdapter:
    """FedIT: average A and B separately over all clients (equal ranks and scalings required).

    Inexact by construction (the product of averages is not the average of products); kept as
    the baseline FLoRA is compared against. Unlike the paper's reference code, every client counts.
    """
    check_compatible(adapters, weights)
    ranks = {a.rank for a in adapters}
    if len(ranks) != 1:
        raise ValueError(f"fedit requires every client to use the same rank, got ranks {sorted(ranks)}")
    return _average(adapters, weights, ranks.pop(), _common_scaling(adapters, "fedit"), dtype)


def zeropad_average(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], dtype: torch.dtype = torch.float32
) -> LoraAdapter:
    """HetLoRA-style: zero-pad every client to the largest rank, then average as FedIT.

    One scaling for everyone, so a client that later takes the leading r_k rows/columns of the
    global LoRA sees the same function the server aggregated.
    """
    check_compatible(adapters, weights)
    return _average(adapters, weights, max(a.rank for a in adapters), _common_scaling(adapters, "zeropad"), dtype)


def ideal_delta(adapters: Sequence[LoraAdapter], weights: Sequence[float], name: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """The update FedAvg of full fine-tuning deltas would apply: sum_k p_k s_k B_k A_k."""
    return sum(p * adapter.delta(name, dtype) for adapter, p in zip(adapters, weights))


def aggregation_error(
    global_adapter: LoraAdapter,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    dtype: torch.dtype = torch.float64,
) -> float:
    """Relative error |s_g B_g A_g - sum p_k s_k B_k A_k|_F / |sum p_k s_k B_k A_k|_F over all modules.

    Float round-off for FLoRA; the cross terms for fedit and zeropad. Zero when both are zero.
    """
    check_compatible(adapters, weights)
    diff_sq = ideal_sq = 0.0
    for name in adapters[0].module_names:
        ideal = ideal_delta(adapters, weights, name, dtype)
        diff_sq += torch.linalg.matrix_norm(global_adapter.delta(name, dtype) - ideal).item() ** 2
        ideal_sq += torch.linalg.matrix_norm(ideal).item() ** 2
    if ideal_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ideal_sq)
