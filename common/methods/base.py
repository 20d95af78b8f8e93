"""The one interface every aggregation method implements, and the algebra they share.

Every method is described by the same four answers (STYLE.md: "how a client starts its round,
what the server merges, what it keeps and what it sends"):

- ``initial``: the global LoRA kept at version 0 (None for methods that start fresh);
- ``start``: how client k starts a round from what is kept: the LoRA its training begins from,
  and the update it removes from the global model to get its round's base weights;
- ``merge``: from the clients' trained LoRAs, the update ``delta`` added to the global model
  (on the server and on every client alike) and the global LoRA kept for the next round; with
  clip factors c_k, each client's change from its start counts c_k times (below);
- ``trains_a``: whether clients train and upload A (FFA-LoRA freezes it: B only goes up);
- ``admits``: whether a client of a given rank and scaling can take part (checked at Join).

What is kept is what the server sends clients to start from (``ARTIFACT_KIND_GLOBAL_LORA``), so it
never holds a client's own factors: averaging methods keep averages, stacking methods keep the
canonical factors of the aggregate (``canonical_adapter``), which depend on the sum alone.

The global model M is always fully merged. Client k trains on ``M - removed_k`` starting from
``init_k``; when ``removed_k == init_k`` its model at step 0 is exactly M (the warm-started exact
methods), and the exact FedAvg of the clients' trained models is

    M + sum_k p_k (s_k B_k A_k - removed_k),

which is what an exact method merges. ``round_error`` measures every method against it.

Clipping (``flora.common.robust``) bounds what a client changed: its trained LoRA minus the LoRA
it started from, s_k B_k A_k - init_k (= s_k B_k A_k - removed_k wherever init_k = removed_k).
A method given clip factors c_k merges as if client k had trained init_k + c_k (s_k B_k A_k -
init_k): exactly so in the product for the stacking methods and ffa (where the shared A makes it
B_init + c_k (B_k - B_init)). fedit and zeropad average factors, so there the client's factors
move toward its start (``clipped_factors``) just so far that the change of its own product is
c_k times its change in norm; the direction of that change is not exactly kept (both factors
move, so the second-order part s dB dA shrinks faster than the first-order one).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from flora.common.aggregation import check_compatible, flora_stack
from flora.common.canonical import canonical_pair, product_norm
from flora.common.lora import LoraAdapter, LoraPair, fresh_a, module_seed, pad_pair, seeded_lora
from flora.common.robust import factor_step
from flora.common.update import concat_pairs


@dataclass(frozen=True)
class ClientStart:
    """How one client starts its round."""

    init: LoraAdapter | None  # the LoRA training starts from, at the client's rank and scaling; None: fresh (B = 0)
    removed: LoraAdapter | None  # subtracted from the global model to give the round's base weights; None: nothing
    train_a: bool = True  # False: A stays as initialised and only B is trained and uploaded


@dataclass(frozen=True)
class RoundResult:
    """What the server does with one round's updates."""

    delta: LoraAdapter  # added to the global model by the server and by every client
    kept: LoraAdapter | None  # the global LoRA the next round's clients start from


class AggregationMethod(ABC):
    """One aggregation method: a stateless object of pure functions over ``LoraAdapter``s (its one
    attribute a memo of ``start``, which changes no result)."""

    name: ClassVar[str]
    exact: ClassVar[bool]  # the merged delta is the exact FedAvg of the clients' trained models
    trains_a: ClassVar[bool] = True
    one_scaling: ClassVar[bool] = False  # a global LoRA of the run's rank and scaling: clients must match it
    partial_modules: ClassVar[bool] = False  # a client may leave modules out (a zero update: exact only for fresh stacking)
    # Client-level DP (issue 31) privately releases the round's sum of clipped changes; everything
    # a method sends must follow from that release alone. None: it does; else why it cannot.
    dp_refusal: ClassVar[str | None] = "no private release is defined for it"
    summary: ClassVar[str]  # one line for --help and the docs
    _memo: tuple[LoraAdapter | None, dict[tuple[int, float], ClientStart]] | None = None  # see cached_start

    def admits(self, rank: int, scaling: float, global_rank: int, required_scaling: float) -> str | None:
        """Why a client of ``rank`` and ``scaling`` cannot take part in a run whose global LoRA has
        ``global_rank`` and ``required_scaling``; None when it can (default: any rank and scaling)."""
        return None

    def validate(self, ranks: Sequence[int], scalings: Sequence[float]) -> None:
        """Refuse a run this method cannot aggregate (before any work starts): ``admits`` for every
        client, with the largest rank and the first client's scaling as the global LoRA's."""
        if not ranks or len(ranks) != len(scalings):
            raise ValueError(f"{self.name}: need one scaling per client rank, got {len(ranks)} ranks, {len(scalings)} scalings")
        for rank, scaling in zip(ranks, scalings):
            reason = self.admits(rank, scaling, max(ranks), scalings[0])
            if reason is not None:
                raise ValueError(f"{self.name}: {reason} (ranks {list(ranks)}, scalings {sorted(set(scalings))})")

    def initial(self, shapes: Mapping[str, tuple[int, int]], rank: int, scaling: float, seed: int) -> LoraAdapter | None:
        """The global LoRA kept at version 0; by default none (round 1 starts every client fresh)."""
        return None

    @abstractmethod
    def start(self, kept: LoraAdapter | None, rank: int, scaling: float) -> ClientStart:
        """How a client of ``rank`` and ``scaling`` starts a round from the kept global LoRA."""

    def starts(self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter]) -> list[ClientStart]:
        """How each update's client started (``cached_start`` for each)."""
        return [self.cached_start(kept, u.rank, u.scaling) for u in updates]

    def cached_start(self, kept: LoraAdapter | None, rank: int, scaling: float) -> ClientStart:
        """``start``, computed once per kept LoRA, rank and scaling, not per client or per call: a
        warm start costs an SVD per module, and a server asks for each client's start when its
        upload arrives and again when the round is aggregated. Only the latest kept LoRA's starts
        are remembered (by identity: the memo holds it, so it is never another object's id).
        Safe from several threads: they only ever replace the memo, never change one in place.
        """
        memo = self._memo
        if memo is None or memo[0] is not kept:
            memo = (kept, {})
            self._memo = memo
        key = (rank, scaling)
        if key not in memo[1]:
            memo[1][key] = self.start(kept, rank, scaling)
        return memo[1][key]

    def removals(self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter]) -> list[LoraAdapter | None]:
        """What each update's client removed from the global model at its start."""
        return [start.removed for start in self.starts(kept, updates)]

    def inits(self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter]) -> list[LoraAdapter | None]:
        """The LoRA each update's client started training from (None: fresh, B = 0)."""
        return [start.init for start in self.starts(kept, updates)]

    @abstractmethod
    def merge(
        self, kept: LoraAdapter | None, updates: Sequence[LoraAdapter], weights: Sequence[float],
        dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
    ) -> RoundResult:
        """The round's delta and the next kept LoRA from the clients' trained LoRAs and weights p_k;
        ``clips`` (default all 1) scales each client's change from its start (module docstring)."""

    def released(
        self, kept: LoraAdapter | None, clients: Sequence[tuple[int, float]], weights: Sequence[float], change: LoraAdapter,
    ) -> RoundResult:
        """The round's result from a private release of its clipped change sum_k p_k c_k (s_k B_k A_k -
        init_k) (issue 31; for a method that freezes A, ``change`` holds A and the released B sum).

        It reads ``change`` and public values only (the kept LoRA, each client's (rank, scaling),
        the weights), so what it returns is post-processing of the release and as private.
        """
        raise ValueError(f"{self.name} cannot run under differential privacy: {self.dp_refusal}")


class PersistentLora(AggregationMethod):
    """Methods whose kept global LoRA starts as PEFT's seeded init (A random, B zero) at the largest rank."""

    one_scaling = True

    def admits(self, rank: int, scaling: float, global_rank: int, required_scaling: float) -> str | None:
        """Averaging factors needs one scaling (averaging A of s=1 with A of s=2 means nothing), and
        a client trains a leading part of the global LoRA, so its rank is at most the global rank."""
        if not math.isclose(scaling, required_scaling, rel_tol=1e-6):
            return f"needs one LoRA scaling for every client: scaling {scaling:g} differs from the run's {required_scaling:g}"
        if rank > global_rank:
            return f"rank {rank} exceeds the global LoRA rank {global_rank}"
        return None

    def initial(self, shapes: Mapping[str, tuple[int, int]], rank: int, scaling: float, seed: int) -> LoraAdapter:
        """Seeded, so that every client and the server build the same version-0 LoRA from the seed alone."""
        return seeded_lora(shapes, rank, scaling, seed)


# --- the shared algebra ---------------------------------------------------------------------


def negated(adapter: LoraAdapter) -> LoraAdapter:
    """The same factors with the opposite update (-s B A): what removes ``adapter`` from a model."""
    return LoraAdapter(adapter.pairs, -adapter.scaling)


def leading(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """The leading ``rank`` rows of A and columns of B (zero-padding's nested prefix)."""
    if rank > adapter.rank:
        raise ValueError(f"client rank {rank} is larger than the global LoRA's rank {adapter.rank}")
    return LoraAdapter({n: LoraPair(p.a[:rank], p.b[:, :rank]) for n, p in adapter.pairs.items()}, adapter.scaling)


def difference(new: LoraAdapter, old: LoraAdapter | None, dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Factors of s' B' A' - s B A, stacked (exact): how replacing a global LoRA changes the model."""
    if old is None:
        return new
    return flora_stack([new, old], [1.0, -1.0], dtype)


def exact_change(
    updates: Sequence[LoraAdapter], weights: Sequence[float], removed: Sequence[LoraAdapter | None],
    dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
) -> LoraAdapter:
    """Stacked factors of sum_k p_k c_k (s_k B_k A_k - removed_k): the exact FedAvg of the round's
    models, each client's change scaled by its clip factor c_k (default 1).

    Clients that removed the same adapter (``removals`` makes one start per rank and scaling)
    share one stacked term weighted by the sum of their p_k c_k, so the stack grows by the
    distinct starts rather than by the clients: R + r wide instead of 2R with equal ranks, which
    the downlink's factorization pays for quadratically.
    """
    scaled = [p * c for p, c in zip(weights, clips or [1.0] * len(weights))]
    terms, factors = list(updates), list(scaled)
    slot: dict[int, int] = {}  # id of a removed adapter -> its index in terms
    for q, gone in zip(scaled, removed):
        if gone is None:
            continue
        if id(gone) in slot:
            factors[slot[id(gone)]] -= q
        else:
            slot[id(gone)] = len(terms)
            terms.append(gone)
            factors.append(-q)
    return flora_stack(terms, factors, dtype)


def clipped_stack(
    updates: Sequence[LoraAdapter], weights: Sequence[float], inits: Sequence[LoraAdapter | None],
    dtype: torch.dtype = torch.float32, clips: Sequence[float] | None = None,
) -> LoraAdapter:
    """Stacked factors of sum_k p_k (init_k + c_k (s_k B_k A_k - init_k)): the average of the
    clients' products, each client's change from its start scaled by c_k (default 1)."""
    clips = clips or [1.0] * len(weights)
    terms, factors = list(updates), [p * c for p, c in zip(weights, clips)]
    for p, c, init in zip(weights, clips, inits):
        if init is not None and c != 1.0:
            terms.append(init)
            factors.append(p * (1.0 - c))
    return flora_stack(terms, factors, dtype)


def plus_starts(
    change: LoraAdapter, inits: Sequence[LoraAdapter | None], weights: Sequence[float], dtype: torch.dtype = torch.float64,
) -> LoraAdapter:
    """Stacked factors of change + sum_k p_k init_k: the average of the clients' clipped products
    (``clipped_stack``) rebuilt from a released change and the public starts.

    Clients of one rank and scaling share one start (``cached_start``), stacked once with the sum
    of their weights: the stack grows by the distinct starts, not by the clients.
    """
    terms, factors = [change], [1.0]
    slot: dict[int, int] = {}  # id of a start -> its index in terms
    for p, init in zip(weights, inits):
        if init is None:
            continue
        if id(init) not in slot:
            slot[id(init)] = len(terms)
            terms.append(init)
            factors.append(0.0)
        factors[slot[id(init)]] += p
    return flora_stack(terms, factors, dtype)


def toward(init: LoraAdapter | None, update: LoraAdapter, clip: float) -> LoraAdapter:
    """Factors init + c (update - init), row by row (same rank and scaling): a clipped client's
    factors for the methods that average factors; exact in the product when A is shared (ffa).
    From a fresh start (None) A alone is scaled, which scales the product by c exactly."""
    if clip == 1.0:
        return update
    pairs = {}
    for name, (a, b) in update.pairs.items():
        if init is None:
            pairs[name] = LoraPair(clip * a, b)
        else:
            a0, b0 = init.pairs[name]
            pairs[name] = LoraPair(a0 + clip * (a - a0), b0 + clip * (b - b0))
    return LoraAdapter(pairs, update.scaling)


def clipped_factors(
    updates: Sequence[LoraAdapter], inits: Sequence[LoraAdapter | None], clips: Sequence[float] | None
) -> list[LoraAdapter]:
    """Each clipped update's factors moved toward its start (``toward``) just so far that its
    product's change from the start is c_k times its own (``factor_step``): for the methods that
    average factors. All as given without clips."""
    if clips is None:
        return list(updates)
    return [u if c == 1.0 else toward(init, u, c if init is None else factor_step(u, init, c))
            for u, init, c in zip(updates, inits, clips)]


def canonical_adapter(adapter: LoraAdapter, rank: int | None = None) -> LoraAdapter:
    """The canonical factors of ``adapter``'s update (scaling 1), cut to ``rank`` directions if given.

    What a stacking method keeps and sends: a function of the product alone, so it reveals the
    aggregate and none of the stacked clients. Modules whose canonical rank is lower are padded
    with zero directions to one rank (a ``LoraAdapter`` has one); ``principal`` drops them again.
    """
    pairs = {}
    for name in adapter.module_names:
        a, b = adapter.pairs[name]
        pairs[name] = canonical_pair(LoraPair(a * adapter.scaling, b), out_dtype=torch.float32)
    width = max(p.a.shape[0] for p in pairs.values()) if rank is None else rank
    return LoraAdapter({n: _fit(p, width) for n, p in pairs.items()}, 1.0)


def _fit(pair: LoraPair, rank: int) -> LoraPair:
    """The leading ``rank`` directions of a canonical pair, zero-padded when it has fewer."""
    a, b = pair.a[:rank], pair.b[:, :rank]
    return pad_pair(LoraPair(a, b), rank) if a.shape[0] < rank else LoraPair(a, b)


def principal(adapter: LoraAdapter, rank: int, scaling: float) -> LoraAdapter:
    """The best rank-``rank`` approximation of ``adapter``'s update, as balanced factors of ``scaling``.

    s B A equals the top-``rank`` singular part of the adapter's update in every module; B and A
    carry sqrt(S / s) each (PiSSA's split), so neither factor starts out dwarfing the other.
    Directions beyond the update's own rank start as a fresh LoRA's (A random as PEFT draws it,
    B zero), seeded by the module's name and ``rank`` so that server and clients agree: the
    product is the same, and they train, where zero rows of A beside zero columns of B (both
    gradients zero) never would.
    """
    pairs = {}
    root = math.sqrt(abs(scaling))
    for name in adapter.module_names:
        a, b = adapter.pairs[name]
        canon = canonical_pair(LoraPair(a * adapter.scaling, b), out_dtype=torch.float64)
        keep = min(rank, canon.a.shape[0])
        a0 = torch.empty(rank, a.shape[1], dtype=torch.float32)
        b0 = torch.zeros(b.shape[0], rank, dtype=torch.float32)
        a0[:keep], b0[:, :keep] = canon.a[:keep] / root, canon.b[:, :keep] / root
        if keep < rank:
            a0[keep:] = fresh_a(rank - keep, a.shape[1], torch.Generator().manual_seed(module_seed(name, rank)))
        pairs[name] = LoraPair(a0, b0)
    return LoraAdapter(pairs, scaling)


def round_error(
    delta: LoraAdapter, updates: Sequence[LoraAdapter], weights: Sequence[float], removed: Sequence[LoraAdapter | None]
) -> float:
    """|delta - sum_k p_k (s_k B_k A_k - removed_k)|_F / |sum_k p_k (s_k B_k A_k - removed_k)|_F.

    How far a round's merged update is from the exact FedAvg of the clients' trained models, in
    float64 over every module: round-off for exact methods, the cross terms for fedit and zeropad.
    (flexlora merges exactly; its loss is at the start, where a client's truncated init is not
    the global model.) Zero when both are zero.
    """
    check_compatible(updates, weights)
    ideal = exact_change(updates, weights, removed, torch.float64)
    diff_sq = ideal_sq = 0.0
    for name in updates[0].module_names:  # from the factors: rank R + rho, never d_out x d_in when thinner
        target, sent = ideal.pairs[name], delta.pairs[name]
        gap = concat_pairs([LoraPair(sent.a.double() * delta.scaling, sent.b), LoraPair(-target.a, target.b)], torch.float64)
        diff_sq += product_norm(gap) ** 2
        ideal_sq += product_norm(target) ** 2
    if ideal_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ideal_sq)
