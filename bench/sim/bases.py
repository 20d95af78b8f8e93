"""The bases a simulated federation's clients train on: full precision, or 4-bit/8-bit (``--quantize``).

The engine's model is the server's: the base in full precision with every delta merged, the
model scored on the validation set. A client with a quantized base trains, as ``flora-client
--quantize`` does, on quantize(base) with the cumulative global update held beside it
(``flora.client.local_weights.HeldUpdate``), never merged into its 4-bit weights. So each
quantization in use gets one such model, built from the base before anything is merged, and is
given every update the global model is given (the same one: what the downlink sends), which
keeps it at quantize(base) + the exact global update of the same version.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from torch import nn

from flora.client.local import compute_dtype
from flora.client.local_weights import LocalWeights, local_weights
from flora.common.basemodel import target_module_shapes
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.quantize import QUANTIZATIONS
from flora.common.update import GlobalUpdate

FULL = "none"


def client_bases(quantize: Sequence[str], clients: int) -> tuple[str, ...]:
    """One base per client: ``quantize`` cycled over the clients (``("none",)``: all full precision)."""
    unknown = [q for q in quantize if q not in QUANTIZATIONS]
    if not quantize or unknown:
        raise ValueError(f"--quantize {','.join(quantize)!r}: expected a comma-separated list of {', '.join(QUANTIZATIONS)}")
    return tuple(quantize[k % len(quantize)] for k in range(clients))


class QuantizedBases:
    """One quantized copy of the base per quantization the clients use, each holding the global update."""

    def __init__(self, base: nn.Module, quantizations: Sequence[str], target_modules: Sequence[str] | None,
                 dtype: str, device) -> None:
        names = sorted(target_module_shapes(base, target_modules))
        wanted = sorted(set(quantizations) - {FULL})
        compute = compute_dtype(dtype, device)
        self.held: dict[str, LocalWeights] = {
            q: local_weights(copy.deepcopy(base), names, q, compute, device) for q in wanted
        }

    def apply(self, update: GlobalUpdate) -> None:
        """Hold ``update`` (scaling 1: b a per module) beside every quantized base."""
        for local in self.held.values():
            local.apply([update])

    def apply_adapter(self, adapter: LoraAdapter) -> None:
        """Hold ``adapter``'s update s b a: what merging it into the global model adds."""
        if self.held:
            self.apply({name: LoraPair(pair.a * adapter.scaling, pair.b) for name, pair in adapter.pairs.items()})

    def models(self) -> Mapping[str, LocalWeights]:
        """The quantized clients' models by quantization (the full-precision clients use the global model)."""
        return self.held
