"""The built-in model's pre-trained weights: shipped as package data, saved and loaded as mirrors.

``flora.demo.pretrain`` trains the seeded tiny Llama of ``flora.common.basemodel`` on generated
general text and saves the result here with a record of how (command, seed, loss, fingerprint);
building the built-in model loads it. Safetensors only: nothing is unpickled, nothing downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora.common.basemodel import fingerprint

FOLDER = Path(__file__).parent / "builtin"
WEIGHTS = FOLDER / "flora-tiny-llama.safetensors"
RECORD = FOLDER / "flora-tiny-llama.json"


def weights_fingerprint(model: nn.Module) -> str:
    """basemodel's fingerprint over every module holding a weight: the whole model, not LoRA's targets."""
    names = [name for name, module in model.named_modules() if isinstance(getattr(module, "weight", None), torch.Tensor)]
    return fingerprint(model, names)


def save_builtin_weights(model: nn.Module, record: dict[str, Any], folder: Path = FOLDER) -> tuple[Path, Path]:
    """Write the weights and, beside them, the record with the weights' fingerprint added."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights, notes = folder / WEIGHTS.name, folder / RECORD.name
    state = {name: value.detach().to(torch.float32).contiguous() for name, value in model.state_dict().items()}
    save_file(state, weights)
    notes.write_text(json.dumps({**record, "fingerprint": weights_fingerprint(model)}, indent=1) + "\n")
    return weights, notes


def read_record(folder: Path = FOLDER) -> dict[str, Any]:
    """The record saved with the weights: how they were trained and the fingerprint they load to."""
    return json.loads((folder / RECORD.name).read_text())


def load_builtin_weights(model: nn.Module, folder: Path = FOLDER) -> None:
    """Load the shipped weights into ``model`` (every tensor, exact shapes) and check the fingerprint.

    A mismatch means the package's files and the code that builds the model disagree: better a
    clear error than a built-in model that silently differs between installations.
    """
    from safetensors.torch import load_file

    model.load_state_dict(load_file(folder / WEIGHTS.name), strict=True)
    expected = read_record(folder)["fingerprint"]
    if (actual := weights_fingerprint(model)) != expected:
        raise ValueError(f"built-in weights {folder / WEIGHTS.name}: fingerprint {actual} is not the recorded {expected}")
