"""Shared fixtures: the built-in tiny model, and the optional real material in ../shared."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

# Tests must never reach a model hub: a stray download fails fast instead of hanging. Set before
# anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread in this process and in every process a test starts (servers, benches, the demo;
# clients take --threads): CI's 2 cores run several of them at once, and torch's default of a thread
# per core each oversubscribes them (6 tiny-model steps: 0.1 s CPU on one thread, 4 s on two here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A Ctrl-C must reach what the tests start: pytest run as a background job of a non-interactive shell
# inherits SIGINT ignored, every process it starts (xdist workers, servers, the demo) would inherit that
# too, and the Ctrl-C tests would fail. A Python handler here is reset to the default at each exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

from flora.common.basemodel import BUILTIN_MODEL, load_model, load_tokenizer, resolve_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """Directory of the built-in tiny Llama (built into the flora cache on first use)."""
    return resolve_model(BUILTIN_MODEL)


@pytest.fixture()
def tiny_model():
    """A fresh float32 copy of the built-in model, safe to modify."""
    return load_model(BUILTIN_MODEL)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_tokenizer(BUILTIN_MODEL)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test when that material is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (optional real material)")
    return path
