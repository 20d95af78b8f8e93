"""Client-level DP-FedAvg releases of one round's update: clip, then a noisy sketch, dense or B sum.

The mechanism (McMahan et al., ICLR 2018; issue 31), as ``flora.common.privacy.accountant``
accounts it. Each participant's change D_k (all target modules together: s_k B_k A_k - init_k,
or, when A is frozen, B_k - B_init) is clipped to Frobenius norm C by a factor
min(1, C / |D_k|_F), which the methods apply as their clip factors c_k, so the merge stays exact
in the product. The round's weights p_k (from the announced example counts, capped by
``max_weight_share``) are fixed by the round's public metadata, so under the replace-one relation
(one data holder's data swapped for another's) the weighted sum sum_k p_k c_k D_k moves by at most
|p_k c_k D_k - p_k c'_k D'_k|_F <= 2 C max_k p_k. Every pass therefore adds Gaussian noise of
standard deviation

    std = sigma * C * max_k p_k        per entry,

a Gaussian mechanism of sensitivity 2 C max_k p_k with noise multiplier sigma / 2: exactly what the
accountant composes under replace-one (with uniform weights, std = sigma C / K, the noise of the
sum sigma C scaled to the mean). One pass covers all modules jointly: the clip is joint, so the
sensitivity of the concatenated release is too.

Releases of the round's noiseless clipped change ``delta`` (any public offset a method adds moves
nothing: sensitivity is of the differences):

- ``sketch`` (two mechanisms): per module Y = delta Omega + N1 (Omega d_in x m, orthonormal
  columns drawn from the round's public seed, ``flora.common.omega``, so |D_k Omega|_F <= |D_k|_F),
  Q = orth(Y), P = delta^T Q + N2 (|D_k^T Q|_F <= |D_k|_F); the update is Q P^T, of rank m
  (``flora.common.sketch``). Q depends on the noisy Y alone, so pass 2's sensitivity holds given
  pass 1's release. A module better sent dense (``sketch_width``) is delta + N1 in pass 1 and
  absent from pass 2: each pass is still one vector whose every client part has norm <= |D_k|_F,
  so a round is two mechanisms whatever the mix (one that turns out all dense releases one, and
  is still accounted as two: an upper bound).
- ``dense`` (one mechanism): delta + N per entry.
- ``b`` (one mechanism, methods that freeze A): the summed B change sum_k p_k c_k (B_k - B_init),
  clipped in the norm of that released quantity, |B_k - B_init|_F: A is public, and clipping
  |s dB_k A|_F instead would not bound |dB_k|_F (A's smallest singular value can be tiny).

The noise comes from a generator seeded by ``secrets`` (``secret_generator``), never from the
run's public seed: a client that knew the seed could regenerate the noise and subtract it.
Under secure aggregation the clients clip and weight (``flora.common.secagg.contribution``) and
the server adds the same noise, block by block in the same order (``noised``), to the unmasked
sums (``flora.common.secagg.finish``): the release is then this one, from the same inputs.
Pure functions, no I/O; the generator is passed in, so tests fix it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flora.common.lora import LoraAdapter, LoraPair
from flora.common.omega import round_seed, sketch_basis
from flora.common.sketch import Change, assemble, broadcast_basis, project_columns, project_rows, range_basis

ReleaseKind = Literal["sketch", "dense"]
RELEASES: tuple[str, ...] = ("sketch", "dense")


def clip_factor(norm: float, clip_norm: float) -> float:
    """min(1, C / |D_k|_F): the factor that brings a change of ``norm`` within the clip norm C."""
    if not (math.isfinite(clip_norm) and clip_norm > 0.0):
        raise ValueError(f"dp_clip_norm {clip_norm} must be a positive number")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def noise_std(noise_multiplier: float, clip_norm: float, weights: Sequence[float]) -> float:
    """sigma * C * max_k p_k: the per-entry standard deviation of every pass (module docstring)."""
    if not weights or min(weights) < 0.0:
        raise ValueError(f"noise_std: weights must be non-empty and non-negative, got {list(weights)}")
    return noise_multiplier * clip_norm * max(weights)


def release_passes(kind: str, trains_a: bool) -> int:
    """Gaussian mechanisms one round releases: 2 for the sketch, 1 for dense and for the B sum
    (a method that freezes A releases its B sum whatever ``kind`` says). What the accountant composes."""
    if kind not in RELEASES:
        raise ValueError(f"dp_release {kind!r} must be one of {', '.join(RELEASES)}")
    return 2 if kind == "sketch" and trains_a else 1


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A noise generator seeded from the operating system's secret randomness, never from the run
    seed (clients know that one: they could subtract the noise)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def gaussian_like(reference: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """N(0, std^2) per entry, of ``reference``'s shape, dtype and device."""
    noise = torch.randn(reference.shape, generator=generator, dtype=reference.dtype, device=generator.device)
    return noise.to(reference.device) * std


def b_change_norm(update: LoraAdapter, init: LoraAdapter) -> float:
    """|B_k - B_init|_F over all modules: the norm of what a method that freezes A releases."""
    return math.sqrt(sum(float((b.double() - init.pairs[n].b.double()).square().sum()) for n, (_, b) in update.pairs.items()))


def noised(parts: Mapping[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """One Gaussian mechanism over all of a pass's blocks: N(0, std^2) added to every entry,
    drawn block by block in sorted module order (the order of the pass's vector under secure
    aggregation, so that both paths draw the same noise from the same generator)."""
    return {n: parts[n] + gaussian_like(parts[n], std, generator) for n in sorted(parts)}


@dataclass(frozen=True)
class SketchRelease:
    """The two noisy passes of a sketch release, per module: everything downstream reads these."""

    y: dict[str, Tensor]  # (d_out, m) of a sketched module: delta Omega + N1
    p: dict[str, Tensor]  # (d_in, m) of a sketched module: delta^T Q' + N2, Q' = orth(Y) in float32 (as broadcast)
    dense: dict[str, Tensor]  # (d_out, d_in) of a module released dense in pass 1: delta + N1


def sketch_release(change: Mapping[str, Change], omegas: Mapping[str, Tensor], std: float,
                   generator: torch.Generator) -> SketchRelease:
    """Both noisy passes (one mechanism each, all modules jointly): pass 1 holds delta Omega of
    each module with an Omega and the dense delta of the others, pass 2 delta^T Q of the former."""
    first = noised({n: project_columns(c, omegas[n]) if n in omegas else _dense(c) for n, c in change.items()},
                   std, generator)
    second = noised({n: project_rows(change[n], broadcast_basis(range_basis(first[n]))) for n in omegas}, std, generator)
    return SketchRelease({n: first[n] for n in omegas}, second, {n: t for n, t in first.items() if n not in omegas})


def sketch_update(release: SketchRelease) -> dict[str, Change]:
    """The released update per module from the noisy passes alone: Q P^T as factors (b = Q,
    a = P^T, undoing Q's float32 rounding: ``assemble``) for a sketched module, the noisy dense
    change for the others."""
    bases = {n: range_basis(y) for n, y in release.y.items()}
    return {**{n: assemble(bases[n], release.p[n], broadcast_basis(bases[n])) for n in sorted(release.y)}, **release.dense}


def sketch_omegas(shapes: Mapping[str, tuple[int, int]], columns: Mapping[str, int], run_seed: int,
                  round_number: int, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Omega per module, from the round's public sketch seed (``flora.common.omega``): the same
    matrices a secure round's clients draw."""
    seed = round_seed(run_seed, round_number)
    return {n: sketch_basis(shapes[n][1], columns[n], seed, n, dtype) for n in shapes}


def _dense(change: Change) -> Tensor:
    return change.b @ change.a if isinstance(change, LoraPair) else change
