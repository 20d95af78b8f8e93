"""Outputs a user loads directly: Hugging Face checkpoints, PEFT adapters, the round history.

Each is published atomically: written under the state directory's ``tmp/``, fsynced, then
renamed into place, so an interrupted server never leaves a half-written checkpoint or history
that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from flora.common.chunks import fsync_dir, fsync_file, write_atomic
from flora.common.lora import LoraAdapter, LoraPair


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as file:
                fsync_file(file)
    for folder in sorted({p.parent for p in root.rglob("*")} | {root}):
        fsync_dir(folder)


def publish_folder(staging: Path, dest: Path) -> None:
    """Move a fully written folder to ``dest`` durably, replacing an older one of that name.

    A folder cannot be renamed over a non-empty one, so an existing ``dest`` (left by an
    interrupted earlier aggregation of the same round) is moved aside first and removed after.
    """
    _fsync_tree(staging)
    old = None
    if dest.exists():
        old = staging.with_name(staging.name + ".old")
        os.replace(dest, old)
    os.replace(staging, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model: nn.Module, tokenizer: Any, dest: Path, tmp: Path, adapter: dict[str, Any] | None = None) -> None:
    """Write a ``from_pretrained``-loadable checkpoint (safetensors + tokenizer) at ``dest``.

    ``adapter`` (keyword arguments of ``save_peft_adapter`` without the folder) adds a PEFT
    adapter of the cumulative update in ``dest/adapter``.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=tmp))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if adapter is not None:
            save_peft_adapter(staging / "adapter", **adapter)
        publish_folder(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_peft_adapter(
    folder: Path,
    adapter: LoraAdapter | Mapping[str, LoraPair],
    *,
    target_modules: Sequence[str],
    base_model: str,
    alpha: float | None = None,
    rslora: bool = False,
    fan_in_fan_out: bool = False,
) -> None:
    """A PEFT LoRA adapter folder (``PeftModel.from_pretrained`` loads it) holding ``adapter``.

    A ``LoraAdapter`` (one rank): ``alpha`` and ``rslora`` must reproduce its scaling under
    PEFT's rule (alpha / r or alpha / sqrt(r)). A mapping of factor pairs (scaling 1, a rank per
    module, e.g. canonical factors): each module gets its own rank and alpha = rank through PEFT's
    ``rank_pattern`` and ``alpha_pattern``. The factors are written as they are: A (r, in) and
    B (out, r) whatever the layer stores; ``fan_in_fan_out`` tells PEFT the layers store (in, out).
    """
    from peft import LoraConfig  # imported here: peft takes seconds to import and only exports need it

    if isinstance(adapter, LoraAdapter):
        if alpha is None:
            raise ValueError("save_peft_adapter: a LoraAdapter needs the alpha that gives its scaling")
        pairs, options = adapter.pairs, {"r": adapter.rank, "lora_alpha": alpha, "use_rslora": rslora}
    else:
        pairs = adapter
        ranks = {name: pair.a.shape[0] for name, pair in pairs.items()}
        top = max(ranks.values())
        # Exact names as patterns (escaped: PEFT matches them as regular expressions).
        pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != top}
        options = {"r": top, "lora_alpha": float(top), "rank_pattern": pattern,
                   "alpha_pattern": {key: float(rank) for key, rank in pattern.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        target_modules=list(target_modules), lora_dropout=0.0, bias="none", base_model_name_or_path=base_model,
        task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out, **options,
    )
    config.save_pretrained(str(folder))
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")


def write_history(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``history.jsonl`` from the committed records: one line per record, atomically.

    Rewriting from the database (rather than appending) is what guarantees exactly one line per
    round after any crash: the file can lag the database, never disagree with it.
    """
    write_atomic(path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in records).encode())
