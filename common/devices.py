"""Choosing a torch device from a setting (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), and what fits on it."""

from __future__ import annotations

import itertools

import torch
from torch import nn


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


def free_memory(device: torch.device) -> int | None:
    """Free bytes of a CUDA device; None for the CPU (whose memory the host's processes share)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def model_bytes(model: nn.Module) -> int:
    """The bytes of a model's parameters and buffers: what one device holding it whole needs for it."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
