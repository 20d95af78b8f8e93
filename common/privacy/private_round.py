"""One round aggregated under client-level differential privacy (issue 31): clip, release, publish.

Three steps, and only the middle one reads the clients' clear updates:

1. ``clip_inputs``: the weight cap and any fixed robust clip as without DP, then the DP clip
   (``flora.common.privacy.release``): each client's clip factor c_k brings its change within C,
   in the norm of what is released (the whole change; the B change when the method freezes A).
2. ``release``: the noiseless clipped change sum_k p_k c_k D_k, noised once per pass: the noisy
   sketch (Y, P), the noisy dense change, or the noisy B sum. Its noise generator is seeded from
   ``secrets`` (never the run seed).
3. ``publish``: the method's ``released`` turns the release and public values (the kept LoRA, the
   clients' ranks, scalings and weights) into the round's delta and kept LoRA.

The server's ``Aggregator`` and ``flora-sim`` both aggregate a private round through here (pure:
no I/O, no server state). Everything the server then writes or serves (downlink, GLOBAL_LORA, merged weights, checkpoints,
PEFT export, validation loss) comes from that delta and kept LoRA: post-processing of the release.
The decisions that go to the round history keep the public weights and caps but not the per-client
norms and clip factors (NaN, written as null): each is a function of one client's clear update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from flora.common.lora import LoraAdapter, LoraPair, pad_pair
from flora.common.methods import AggregationMethod, RoundResult
from flora.common.methods.base import exact_change
from flora.common.privacy.release import (
    SketchRelease, b_change_norm, clip_factor, noise_std, noised, secret_generator, sketch_omegas, sketch_release,
    sketch_update,
)
from flora.common.robust import Decision, RobustPolicy, robust_inputs
from flora.common.sketch import rank_bound, sketch_width
from flora.common.update import as_pair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Privacy:
    """The run's DP release settings (the server's dp_* settings) and the public sketch seed."""

    noise_multiplier: float  # sigma
    clip_norm: float  # C
    release: str  # "sketch" or "dense" (a method that freezes A always releases its B sum)
    seed: int  # the run's seed: Omega's, public


@dataclass(frozen=True)
class Clipped:
    """A round's inputs after the robustness rules and the DP clip."""

    updates: list[LoraAdapter]
    weights: list[float]
    clips: list[float]
    decisions: list[Decision]  # for the history: per-client norms and clip factors dropped

    @property
    def clients(self) -> list[tuple[int, float]]:
        """Each client's (rank, scaling): public, announced at Join and in the upload's header."""
        return [(u.rank, u.scaling) for u in self.updates]


@dataclass(frozen=True)
class Release:
    """What leaves the mechanism in one round: everything published is computed from ``change``."""

    kind: str  # "sketch", "dense" or "b"
    std: float  # per entry, every pass
    change: LoraAdapter  # the released (noisy) change; for "b": the shared A and the noisy B sum
    sketch: SketchRelease | None = None  # the noisy passes (Y, P) of modules released by sketch


def private_round(
    method: AggregationMethod, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], claimed: Sequence[float],
    policy: RobustPolicy, privacy: Privacy, number: int, generator: torch.Generator | None = None,
) -> tuple[RoundResult, Clipped, Release]:
    """Round ``number``'s result under DP (module docstring); ``generator`` is for tests only."""
    clipped = clip_inputs(method, kept, updates, claimed, policy, privacy.clip_norm)
    noise = generator if generator is not None else secret_generator(updates[0].pairs[updates[0].module_names[0]].a.device)
    released = release(method, kept, clipped, privacy, number, noise)
    log.info("round %d: private %s release of %d clients, noise std %.3g per entry", number, released.kind,
             len(clipped.updates), released.std)
    return publish(method, kept, clipped.clients, clipped.weights, released), clipped, released


def clip_inputs(
    method: AggregationMethod, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], claimed: Sequence[float],
    policy: RobustPolicy, clip_norm: float,
) -> Clipped:
    """The robust inputs with every change clipped to ``clip_norm`` in the released quantity's norm."""
    if policy.clip_median_multiple is not None or policy.reject_median_multiple is not None:
        raise ValueError("clip_median_multiple and reject_median_multiple compare each update with the round's median "
                         "norm, which depends on every client's data: unset them when dp_noise_multiplier is set")
    starts = method.starts(kept, updates)
    adapters, weights, clips, decisions = robust_inputs(updates, [s.init for s in starts], claimed, policy)
    norms = ([d.norm for d in decisions] if method.trains_a
             else [b_change_norm(u, s.init) for u, s in zip(adapters, starts)])  # no rejection under DP
    clips = [min(c, clip_factor(n, clip_norm)) for c, n in zip(clips, norms)]
    public = [replace(d, norm=math.nan, clip_factor=math.nan) for d in decisions]
    return Clipped(adapters, weights, clips, public)


def release(method: AggregationMethod, kept: LoraAdapter | None, clipped: Clipped, privacy: Privacy, number: int,
            generator: torch.Generator) -> Release:
    """The noisy release of the round's clipped change: the only step that reads clear updates."""
    std = noise_std(privacy.noise_multiplier, privacy.clip_norm, clipped.weights)
    if not method.trains_a:
        sums = _b_sum(kept, clipped)
        noisy = noised(sums, std, generator)
        return Release("b", std, LoraAdapter({n: LoraPair(kept.pairs[n].a, noisy[n]) for n in noisy}, kept.scaling))
    inits = [s.init for s in method.starts(kept, clipped.updates)]
    change = exact_change(clipped.updates, clipped.weights, inits, torch.float64, clipped.clips)  # scaling 1
    if privacy.release == "dense":
        dense = noised({n: p.b @ p.a for n, p in change.pairs.items()}, std, generator)
        return Release("dense", std, _padded({n: as_pair(d) for n, d in dense.items()}))
    starts = [i.rank for i in inits if i is not None]
    return _sketched(change, rank_bound([u.rank for u in clipped.updates], starts), std, privacy.seed, number, generator)


def publish(method: AggregationMethod, kept: LoraAdapter | None, clients: Sequence[tuple[int, float]],
            weights: Sequence[float], released: Release) -> RoundResult:
    """The round's delta and kept LoRA from the release and public values only (no update reaches it)."""
    return method.released(kept, clients, weights, released.change)


def _sketched(change: LoraAdapter, bound: int, std: float, seed: int, number: int, generator: torch.Generator) -> Release:
    """The noisy two-pass sketch; a module that ``sketch_width`` sends dense (two passes would
    move, and noise, more entries than its dense change) is noised dense in pass 1. Both are
    within each pass's sensitivity, so the round is two mechanisms. Omega, the layout and the
    order of the noise are a secure round's (``flora.common.secagg.plan``)."""
    shapes = {n: (p.b.shape[0], p.a.shape[1]) for n, p in change.pairs.items()}
    columns = {n: sketch_width(bound, *shape) for n, shape in shapes.items()}
    thin = {n: shapes[n] for n, m in columns.items() if m}
    omegas = {n: o.to(change.pairs[n].a.device) for n, o in sketch_omegas(thin, columns, seed, number).items()}
    passes = sketch_release(change.pairs, omegas, std, generator)
    parts = {n: c if isinstance(c, LoraPair) else as_pair(c) for n, c in sketch_update(passes).items()}
    return Release("sketch", std, _padded(parts), passes)


def _padded(parts: dict[str, LoraPair]) -> LoraAdapter:
    """Modules of different ranks as one adapter of scaling 1 (zero-padded: the same products)."""
    rank = max(p.a.shape[0] for p in parts.values())
    return LoraAdapter({n: pad_pair(p, rank) for n, p in parts.items()}, 1.0)


def _b_sum(kept: LoraAdapter, clipped: Clipped) -> dict[str, torch.Tensor]:
    """sum_k p_k c_k pad(B_k - B_init,k) per module (d_out x r), in float64."""
    sums = {n: torch.zeros(b.shape[0], kept.rank, dtype=torch.float64, device=b.device) for n, (_, b) in kept.pairs.items()}
    for update, p, c in zip(clipped.updates, clipped.weights, clipped.clips):
        for name, (_, b) in update.pairs.items():
            start = kept.pairs[name].b[:, : update.rank].double()
            sums[name][:, : update.rank] += p * c * (b.double() - start)
    return sums
