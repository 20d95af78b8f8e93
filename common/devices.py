"""Choosing a torch device from a setting: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch


def resolve_device(spec: str) -> torch.device:
    """``auto`` is the first CUDA device when present, else the CPU; an explicit CUDA device must exist.

    Checked up front so that a host without the GPU it was configured for fails at start with the
    setting named, not in the middle of a round.
    """
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return device
