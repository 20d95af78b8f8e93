"""LoRA factors as plain tensors: the one in-memory form every other module speaks.

A ``LoraAdapter`` maps each adapted module's name in the base model
("model.layers.0.self_attn.q_proj") to its factors A (r x d_in) and B (d_out x r), with one
scaling s for all modules, so that the module's weight update is ``s * B @ A``. A client's
update, a stacked global adapter (scaling 1) and a persistent fedit/zeropad global LoRA are
all this one type.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class LoraPair(NamedTuple):
    """The two factors of one module: ``a`` is (r, d_in), ``b`` is (d_out, r)."""

    a: Tensor
    b: Tensor


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """LoRA's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class LoraAdapter:
    """LoRA factors for a set of modules sharing one rank and one scaling."""

    pairs: Mapping[str, LoraPair]
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("a LoRA adapter needs at least one module")
        ranks = set()
        for name, (a, b) in self.pairs.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                    "(r, d_in) and (d_out, r) factors of one rank"
                )
            ranks.add(a.shape[0])
        if 0 in ranks:
            raise ValueError("LoRA rank must be >= 1, got a module with rank 0")
        if len(ranks) != 1:
            raise ValueError(f"all modules of an adapter must share one rank, got ranks {sorted(ranks)}")
        if not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be finite, got {self.scaling}")

    @property
    def rank(self) -> int:
        """The rank r shared by every module."""
        return next(iter(self.pairs.values())).a.shape[0]

    @property
    def module_names(self) -> list[str]:
        """Adapted module names, sorted (the order used on the wire)."""
        return sorted(self.pairs)

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight update ``s * B @ A`` of one module, computed in ``dtype``."""
        a, b = self.pairs[name]
        return (b.to(dtype) @ a.to(dtype)) * self.scaling

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoraAdapter:
        """The same adapter with every factor moved/cast."""
        return LoraAdapter(
            {n: LoraPair(p.a.to(device=device, dtype=dtype), p.b.to(device=device, dtype=dtype)) for n, p in self.pairs.items()},
            self.scaling,
        )


def pad_pair(pair: LoraPair, rank: int) -> LoraPair:
    """Zero-pad A's rows and B's columns up to ``rank`` (same product B @ A)."""
    a, b = pair
    extra = rank - a.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {a.shape[0]} down to {rank}")
    return LoraPair(torch.nn.functional.pad(a, (0, 0, 0, extra)), torch.nn.functional.pad(b, (0, extra)))  # (rank, d_in), (d_out, rank)


def pad_rank(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """The same adapter zero-padded to ``rank`` in every module."""
    return LoraAdapter({name: pad_pair(pair, rank) for name, pair in adapter.pairs.items()}, adapter.scaling)


def seeded_lora(shapes: Mapping[str, tuple[int, int]], rank: int, scaling: float, seed: int) -> LoraAdapter:
    """A fresh LoRA as PEFT initialises one (A Kaiming-uniform, B zero), drawn from ``seed`` alone.

    The global LoRA of version 0 (fedit, zeropad, fedex, ffa): every client starts round 1 from these same
    factors, wherever it runs, because they depend on nothing but the seed.
    """
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, (d_out, d_in) in sorted(shapes.items()):
        pairs[name] = LoraPair(fresh_a(rank, d_in, generator), torch.zeros(d_out, rank))  # B: (d_out, r)
    return LoraAdapter(pairs, scaling)


def fresh_a(rows: int, d_in: int, generator: torch.Generator) -> Tensor:
    """Rows of A as PEFT initialises them: Kaiming-uniform with a = sqrt(5), i.e. uniform in
    +-1/sqrt(d_in). Beside a zero B they leave the product unchanged and still train (B's gradient
    is not zero), which two zero factors never do."""
    a = torch.empty(rows, d_in)  # (r, d_in)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def module_seed(name: str, rank: int) -> int:
    """A seed from a module's name and a rank alone: server and clients draw the same factors."""
    return zlib.crc32(f"{name}:{rank}".encode())
