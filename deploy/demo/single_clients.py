"""Each client's own model at the end of the run, to set beside the merged one.

The federation's point is that each site contributes what the others lack. To show it, the
demo scores every client's own model: the global model of the round before the last (what the
client started its last round from) plus that client's last update alone, as the run's method
would merge it were that client the round's only participant. For the exact methods that is the
very model the client had when its last round's training ended. Everything is read from the
server's state directory: the downlinks it served, the global LoRA it kept and the accepted
updates (``updates/r<round>/<client id>.<sha>.safetensors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from flora.common.lora import lora_scaling
from flora.common.merge import merged_update, merged_weights
from flora.common.methods import get_method
from flora.common.payload import read_adapter, read_update
from flora.server.layout import Layout


def previous_global(layout: Layout, weights: dict[str, Tensor], version: int) -> dict[str, Tensor]:
    """The base ``weights`` with the downlinks of versions 1..``version`` merged, as clients merge them."""
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    for number in range(1, version + 1):
        update, _ = read_update(layout.downlink(number), shapes)
        weights = {**weights, **merged_update(weights, update)}
    return weights


def single_client_weights(
    state_dir: Path, base_weights: dict[str, Tensor], method_name: str, last: dict[str, Any]
) -> dict[str, dict[str, Tensor]]:
    """Per client name of the last round (history record ``last``): its own model's target weights."""
    layout, method = Layout(state_dir), get_method(method_name)
    shapes = {name: tuple(w.shape) for name, w in base_weights.items()}
    before = previous_global(layout, dict(base_weights), last["round"] - 1)
    kept_path = layout.global_artifact(last["round"] - 1)
    kept = read_adapter(kept_path, shapes)[0] if kept_path.exists() else None
    models = {}
    for client in sorted(last["clients"], key=lambda c: c["name"]):
        scaling = lora_scaling(client["rank"], client["alpha"], False)
        start = method.start(kept, client["rank"], scaling)
        path = next((state_dir / "updates" / f"r{last['round']:06d}").glob(f"{client['client_id']}.*.safetensors"))
        adapter, _ = read_adapter(path, shapes, rank=client["rank"], scaling=scaling,
                                  frozen_a=None if start.train_a else start.init)
        alone = method.merge(kept, [adapter], [1.0]).delta
        models[client["name"]] = {**before, **merged_weights(before, alone)}
    return models
