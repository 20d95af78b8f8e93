"""The server's downlink in the simulation: what every model merges when the downlink is compressed.

The real server does not merge a round's stacked aggregate: it plans the round's downlink
(``flora.common.downlink.plan_downlink``: per module canonical factors or the dense delta, cut to
a retained energy and/or a rank cap and rounded to the downlink dtype), merges exactly what it
sends, and carries what it did not send into the next round's aggregate (error feedback). This
module does the same to each round's delta with the same functions, so that flora-sim measures
what a compressed downlink costs in learning quality: ``DownlinkChannel.merge`` replaces the
engine's plain merge of the delta. The exact policy (the default) merges the delta unchanged,
exactly as before, so exact runs are not changed by this module.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn

from flora.common.downlink import WIRE_DTYPES, DownlinkPolicy, plan_downlink
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.merge import merge_into_model, merged_update, module_weights
from flora.common.update import ModuleUpdate, module_shape, update_numel
from flora.sim.bases import QuantizedBases

EXACT = DownlinkPolicy()


class DownlinkChannel:
    """One run's downlink: the policy, and the remainder carried from round to round."""

    def __init__(self, policy: DownlinkPolicy = EXACT) -> None:
        self.policy = policy
        self.remainder: dict[str, ModuleUpdate] = {}

    def merge(self, model: nn.Module, delta: LoraAdapter, bases: QuantizedBases | None = None) -> dict[str, Any] | None:
        """Merge what the server would send for ``delta`` into ``model`` (and hold it beside the
        quantized ``bases``, flora.sim.bases); the round's downlink figures.

        Exact policy: ``delta`` itself, and None (nothing is cut, nothing is carried). Otherwise the
        server's history figures plus ``values`` sent and ``dense_values`` (the dense delta's).
        """
        if not self.policy.lossy:
            merge_into_model(model, delta)
            if bases is not None:
                bases.apply_adapter(delta)
            return None
        stack = {name: LoraPair(pair.a * delta.scaling, pair.b) for name, pair in delta.pairs.items()}  # scaling 1
        downlink = plan_downlink(stack, self.remainder, self.policy)
        live = module_weights(model, sorted(downlink.update))
        updated = merged_update(live, downlink.update)  # all modules or none, as the server and clients merge
        with torch.no_grad():
            for name, weight in live.items():
                weight.copy_(updated[name])
        if bases is not None:
            bases.apply(downlink.update)
        self.remainder = downlink.remainder
        dense = sum(math.prod(module_shape(part)) for part in downlink.update.values())
        return {**downlink.summary(), "values": update_numel(downlink.update), "dense_values": dense}


def policy_label(policy: DownlinkPolicy) -> str:
    """A short name for tables: ``exact``, ``e0.99``, ``r4``, ``e0.95+bfloat16``."""
    parts = []
    if policy.energy < 1.0:
        parts.append(f"e{policy.energy:g}")
    if policy.max_rank is not None:
        parts.append(f"r{policy.max_rank}")
    if policy.dtype != torch.float32:
        parts.append(next(name for name, dtype in WIRE_DTYPES.items() if dtype == policy.dtype))
    return "+".join(parts) or "exact"


def parse_policy(text: str) -> DownlinkPolicy:
    """``exact`` or a ``+``-joined mix of ``eFRACTION``, ``rRANK`` and a dtype name (``e0.95+r8+bfloat16``)."""
    energy, max_rank, dtype = 1.0, None, torch.float32
    for part in (p.strip() for p in text.split("+")):
        try:
            if part == "exact":
                continue
            if part in WIRE_DTYPES:
                dtype = WIRE_DTYPES[part]
            elif part[:1] == "e":
                energy = float(part[1:])
            elif part[:1] == "r":
                max_rank = int(part[1:])
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"downlink {text!r}: {part!r} is not exact, eFRACTION, rRANK or one of {', '.join(WIRE_DTYPES)}"
            ) from None
    return DownlinkPolicy(energy, max_rank, dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """flora-sim's downlink options, named as flora-server's."""
    parser.add_argument("--downlink-energy", type=float, default=1.0,
                        help="retained energy of each module's downlink, in (0, 1]; the rest is carried (%(default)s: exact)")
    parser.add_argument("--downlink-max-rank", type=int, default=0, help="rank cap of each module's downlink (%(default)s: none)")
    parser.add_argument("--downlink-dtype", choices=list(WIRE_DTYPES), default="float32",
                        help="dtype of the downlink's tensors; the rounding is carried (%(default)s)")


def policy_from_args(args: argparse.Namespace) -> DownlinkPolicy:
    """The policy the options ask for (ValueError naming the option when out of range)."""
    return DownlinkPolicy(args.downlink_energy, args.downlink_max_rank or None, WIRE_DTYPES[args.downlink_dtype])
