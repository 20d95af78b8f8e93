"""Splitting examples and listing folders of per-client data files (the demo's and flora-sim's)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from flora.common.data.readers import DATA_SUFFIXES

T = TypeVar("T")


def split_examples(items: Sequence[T], validation: float | int, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split into (train, validation) deterministically: the same seed always picks the same items.

    ``validation`` is a fraction in (0, 1) when a float and a count when an int; both parts keep
    the input order. At least one item stays for training.
    """
    n = len(items)
    if isinstance(validation, bool) or not isinstance(validation, (int, float)):
        raise TypeError(f"validation must be a fraction (float) or a count (int), got {validation!r}")
    if isinstance(validation, float):
        if not 0.0 < validation < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {validation}")
        count = max(1, round(n * validation))
    else:
        if validation < 0:
            raise ValueError(f"validation count must be >= 0, got {validation}")
        count = validation
    if count >= n:
        raise ValueError(f"a validation set of {count} leaves none of the {n} examples for training")
    chosen = set(random.Random(seed).sample(range(n), count))
    train = [item for i, item in enumerate(items) if i not in chosen]
    return train, [item for i, item in enumerate(items) if i in chosen]


# --- folders of per-client files ------------------------------------------------------------


def _natural_key(path: Path) -> list[Any]:
    """Sort client_2 before client_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def data_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """A folder of one data file per client: (client files in natural order, validation files).

    Files whose name starts with ``validation`` hold held-out data (the demo's sample data writes
    one), not a client's. The demo and the simulator read folders the same way through this.
    """
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} is not a directory")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES), key=_natural_key)
    validation = [p for p in files if p.name.startswith("validation")]
    clients = [p for p in files if p not in validation]
    if not clients:
        raise ValueError(f"data folder {folder} holds no {'/'.join(DATA_SUFFIXES)} client files (one per client expected)")
    return clients, validation
