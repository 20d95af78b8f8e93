"""LoRA factors and merged module weights as safetensors payloads, validated before loading.

Every payload that crosses the network is untrusted (DESIGN.md section 7). ``read_adapter``,
``check_adapter`` and ``read_weights`` therefore check the safetensors header themselves
(``flora.common.payload_header``: limits, names, dtypes, shapes, byte layout) before the
safetensors library sees a single byte; only then are tensors loaded, and every value is checked
finite. ``check_adapter`` validates a file without keeping it in memory, for servers that receive
large uploads and load them only when they aggregate. Nothing here ever unpickles. Tensor names are ``<module>.lora_A`` (r, d_in) and
``<module>.lora_B`` (d_out, r) for adapters (``lora_B`` alone for an update whose A is frozen at a
global LoRA the reader holds: FFA-LoRA), ``<module>.weight`` (d_out, d_in) for merged weights,
and for a downlink update (``flora.update.v1``) per module either ``lora_A``/``lora_B`` of that
module's own rank or ``<module>.delta`` (d_out, d_in).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from torch import Tensor

from flora.common.chunks import file_sha256, fsync_file, publish, source_size
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.oserrors import errno_in_text
from flora.common.payload_header import (
    ALLOWED_DTYPES,
    DTYPE_NAMES,
    Header,
    PayloadLimits,
    allowed_dtypes,
    artifact_limits,
    check_adapter_names,
    check_adapter_shapes,
    check_names,
    check_shape,
    check_update_shapes,
    read_header,
)
from flora.common.payload_meta import WEIGHTS_KINDS, PayloadError, PayloadMeta
from flora.common.update import GlobalUpdate, ModuleUpdate, is_factors

__all__ = [
    "ALLOWED_DTYPES", "PayloadError", "PayloadLimits", "PayloadMeta", "artifact_limits", "check_adapter", "encode_adapter",
    "encode_update", "encode_weights", "read_adapter", "read_update", "read_weights", "write_adapter", "write_update",
    "write_weights",
]
# Finite checks take files in pieces of this size, so validating never holds a whole payload.
_CHECK_BLOCK = 1 << 20


def encode_adapter(
    adapter: LoraAdapter, meta: PayloadMeta, dtype: torch.dtype | None = None, *, with_a: bool = True
) -> bytes:
    """Serialize an adapter in memory, e.g. to upload it without touching the disk (B alone when not ``with_a``)."""
    return _canonical_bytes(save_bytes(_adapter_tensors(adapter, meta, dtype, with_a), metadata=meta.to_metadata()))


def write_adapter(
    path: Path, adapter: LoraAdapter, meta: PayloadMeta, dtype: torch.dtype | None = None, *, with_a: bool = True
) -> tuple[int, str]:
    """Write an adapter file atomically and return its (size, hex sha256) for the wire header.

    Without ``with_a`` only the B factors are written: the upload of a method that freezes A.
    """
    tensors = _adapter_tensors(adapter, meta, dtype, with_a)
    return _write_atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta.to_metadata()))


def encode_weights(weights: Mapping[str, Tensor], meta: PayloadMeta, dtype: torch.dtype | None = None) -> bytes:
    """Serialize merged module weights (``<module>.weight``) in memory."""
    return _canonical_bytes(save_bytes(_weight_tensors(weights, meta, dtype), metadata=meta.to_metadata()))


def write_weights(
    path: Path, weights: Mapping[str, Tensor], meta: PayloadMeta, dtype: torch.dtype | None = None
) -> tuple[int, str]:
    """Write merged module weights atomically and return (size, hex sha256)."""
    tensors = _weight_tensors(weights, meta, dtype)
    return _write_atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta.to_metadata()))


def read_adapter(
    source: bytes | Path,
    expected: Mapping[str, tuple[int, int]],
    *,
    rank: int | None = None,
    scaling: float | None = None,
    limits: PayloadLimits = PayloadLimits(),
    frozen_a: LoraAdapter | None = None,
) -> tuple[LoraAdapter, PayloadMeta]:
    """Validate and load an adapter payload for the modules ``expected`` maps to (d_out, d_in).

    ``rank`` is the rank the sender declared elsewhere (e.g. in the upload header); ``scaling``
    is the caller's trusted scaling, which wins over the payload's own metadata. With
    ``frozen_a`` the payload must hold B alone, and each A is the leading rank rows of its A.
    """
    header, meta = _adapter_header(source, expected, rank, limits, frozen_a is None)
    tensors = _load(source, header)
    if frozen_a is None:
        pairs = {m: LoraPair(tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]) for m in sorted(expected)}
    else:
        if meta.rank > frozen_a.rank:
            raise PayloadError(f"metadata 'rank': {meta.rank} exceeds the frozen A's rank {frozen_a.rank}")
        pairs = {m: LoraPair(frozen_a.pairs[m].a[: meta.rank].to("cpu"), tensors[f"{m}.lora_B"]) for m in sorted(expected)}
    return LoraAdapter(pairs, meta.scaling if scaling is None else scaling), meta


def check_adapter(
    path: Path, expected: Mapping[str, tuple[int, int]], *, rank: int | None = None,
    limits: PayloadLimits = PayloadLimits(), with_a: bool = True,
) -> PayloadMeta:
    """Every check of ``read_adapter`` on a file, reading it in 1 MiB pieces instead of loading it.

    What a server runs on an upload it will only load later, when it aggregates: memory stays at
    one piece however large the payload, and safetensors itself must accept the file as well.
    Without ``with_a`` the file must hold B alone (the run's method freezes A).
    """
    header, meta = _adapter_header(path, expected, rank, limits, with_a)
    with open_safetensors(path):
        pass
    _check_file_finite(path, header)
    return meta


def _adapter_header(
    source: bytes | Path, expected: Mapping[str, tuple[int, int]], rank: int | None, limits: PayloadLimits, with_a: bool
) -> tuple[Header, PayloadMeta]:
    """The validated header and metadata of an adapter payload (no tensor byte read yet)."""
    header = read_header(source, limits)
    meta = PayloadMeta.from_metadata(header.metadata)
    if not meta.is_adapter:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} is not an adapter payload")
    check_adapter_names(header.tensors, expected, with_a)
    found = check_adapter_shapes(header.tensors, expected, rank, limits, with_a)
    if meta.rank != found:
        raise PayloadError(f"metadata 'rank': {meta.rank} does not match the tensors' rank {found}")
    return header, meta


def read_weights(
    source: bytes | Path,
    expected: Mapping[str, tuple[int, int]],
    *,
    limits: PayloadLimits = PayloadLimits(),
) -> tuple[dict[str, Tensor], PayloadMeta]:
    """Validate and load merged weights, returned by module name (without ``.weight``)."""
    header = read_header(source, limits)
    meta = PayloadMeta.from_metadata(header.metadata)
    if meta.kind not in WEIGHTS_KINDS:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} is not a merged-weights payload")
    check_names(header.tensors, {f"{m}.weight" for m in expected})
    for module, (d_out, d_in) in sorted(expected.items()):
        check_shape(f"{module}.weight", header.tensors, (d_out, d_in), "(out_features, in_features)")
    tensors = _load(source, header)
    return {m: tensors[f"{m}.weight"] for m in sorted(expected)}, meta


def encode_update(update: GlobalUpdate, meta: PayloadMeta) -> bytes:
    """Serialize a downlink update (or remainder) in memory, each tensor in its own dtype."""
    return _canonical_bytes(save_bytes(_update_tensors(update, meta), metadata=meta.to_metadata()))


def write_update(path: Path, update: GlobalUpdate, meta: PayloadMeta) -> tuple[int, str]:
    """Write a downlink update (or remainder) atomically and return its (size, hex sha256)."""
    tensors = _update_tensors(update, meta)
    return _write_atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta.to_metadata()))


def read_update(
    source: bytes | Path, expected: Mapping[str, tuple[int, int]], *, limits: PayloadLimits = PayloadLimits()
) -> tuple[dict[str, ModuleUpdate], PayloadMeta]:
    """Validate and load a downlink update: per module ``lora_A``/``lora_B`` of its own rank, or ``delta``."""
    header = read_header(source, limits)
    meta = PayloadMeta.from_metadata(header.metadata)
    if not meta.is_update:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} is not a downlink update payload")
    forms = check_update_shapes(header.tensors, expected, limits)
    tensors = _load(source, header)
    update: dict[str, ModuleUpdate] = {}
    for module in sorted(expected):
        if forms[module] == "dense":
            update[module] = tensors[f"{module}.delta"]
        else:
            update[module] = LoraPair(tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"])
    return update, meta


# --- encoding ---------------------------------------------------------------------------------


def _adapter_tensors(
    adapter: LoraAdapter, meta: PayloadMeta, dtype: torch.dtype | None, with_a: bool = True
) -> dict[str, Tensor]:
    if not meta.is_adapter:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} cannot describe a LoRA adapter")
    if meta.rank != adapter.rank:
        raise PayloadError(f"metadata 'rank': {meta.rank} does not match the adapter's rank {adapter.rank}")
    if not math.isclose(meta.scaling, adapter.scaling, rel_tol=1e-6):
        raise PayloadError(f"metadata 'scaling': {meta.scaling} does not match the adapter's {adapter.scaling}")
    tensors = {}
    for module in adapter.module_names:
        a, b = adapter.pairs[module]
        if with_a:
            tensors[f"{module}.lora_A"] = _prepare(f"{module}.lora_A", a, dtype)
        tensors[f"{module}.lora_B"] = _prepare(f"{module}.lora_B", b, dtype)
    return tensors


def _update_tensors(update: GlobalUpdate, meta: PayloadMeta) -> dict[str, Tensor]:
    if not meta.is_update:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} cannot describe a downlink update")
    if not update:
        raise PayloadError("a downlink update needs at least one module")
    tensors = {}
    for module in sorted(update):
        part = update[module]
        if is_factors(part):
            tensors[f"{module}.lora_A"] = _prepare(f"{module}.lora_A", part.a, None)
            tensors[f"{module}.lora_B"] = _prepare(f"{module}.lora_B", part.b, None)
        else:
            tensors[f"{module}.delta"] = _prepare(f"{module}.delta", part, None)
    return tensors


def _weight_tensors(weights: Mapping[str, Tensor], meta: PayloadMeta, dtype: torch.dtype | None) -> dict[str, Tensor]:
    if meta.kind not in WEIGHTS_KINDS:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} cannot describe merged weights")
    if not weights:
        raise PayloadError("merged weights need at least one module")
    return {f"{m}.weight": _prepare(f"{m}.weight", weights[m], dtype) for m in sorted(weights)}


def _prepare(name: str, tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Cast to a wire dtype on the CPU; refuse what a reader would refuse, before writing it."""
    out = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    if out.dtype not in DTYPE_NAMES:
        raise PayloadError(f"tensor {name!r}: dtype {out.dtype} is not allowed (allowed: {allowed_dtypes()})")
    _check_finite(name, out)
    return out


def _write_atomic(path: Path, write: Callable[[Path], None]) -> tuple[int, str]:
    """Write through a temporary file beside ``path``, so a crash never leaves a torn payload."""
    # A fresh random name rather than mkstemp: the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = _canonical_header(file.read(length))
            file.seek(8)
            file.write(header)
            fsync_file(file)
        size, digest = source_size(tmp), file_sha256(tmp)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, digest


def _canonical_bytes(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    return data[:8] + _canonical_header(data[8 : 8 + length]) + data[8 + length :]


def _canonical_header(raw: bytes) -> bytes:
    """Sort the metadata that safetensors wrote, in place and at the same length.

    safetensors serializes ``__metadata__`` from a Rust HashMap, in a different order on every
    call, so the same adapter would get a different sha256 each time it is encoded. The sha256
    is the upload's idempotency key and what makes runs reproducible, so the order is fixed
    here; the rewrite is checked to be the same JSON of the same length, or refused.
    """
    prefix = b'{"__metadata__":'
    metadata = json.loads(raw)["__metadata__"]
    canonical = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    end = len(prefix) + len(canonical)
    if not raw.startswith(prefix) or json.loads(raw[len(prefix) : end]) != metadata:
        raise RuntimeError("safetensors wrote a header layout this module does not recognise")
    return prefix + canonical + raw[end:]


# --- loading ----------------------------------------------------------------------------------


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` of a file (mmapped, on the CPU), failing as what went wrong.

    safetensors reports every file it cannot open as "No such file or directory" (out of file
    descriptors too) and an OS error while reading as a ``SafetensorError`` text: the first is
    raised as the OS's own error, the second as the ``OSError`` it names. Only what is wrong
    with the bytes is a ``PayloadError``: a full disk or an fd limit is never the payload's fault.
    """
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            yield file
    except FileNotFoundError:
        os.close(os.open(path, os.O_RDONLY))  # raises the real reason the file did not open, if any
        raise
    except SafetensorError as err:
        if (code := errno_in_text(str(err))) is not None:
            raise OSError(code, os.strerror(code), str(path)) from err
        raise PayloadError(f"safetensors refused the payload: {err}") from None


def _load(source: bytes | Path, header: Header) -> dict[str, Tensor]:
    """Load the validated tensors; a file goes through safe_open so that it is mmapped, not read."""
    if isinstance(source, Path):
        with open_safetensors(source) as file:
            tensors = {name: file.get_tensor(name) for name in header.tensors}
    else:
        try:
            tensors = load_bytes(bytes(source))
        except SafetensorError as err:
            raise PayloadError(f"safetensors refused the payload: {err}") from None
    for name, info in header.tensors.items():
        tensor = tensors[name]
        # The header was validated separately; a file swapped in between must not slip through.
        if tuple(tensor.shape) != info.shape or tensor.dtype != ALLOWED_DTYPES[info.dtype][0]:
            raise PayloadError(f"tensor {name!r}: changed between validation and loading")
        _check_finite(name, tensor)
    return tensors


def _check_finite(name: str, tensor: Tensor) -> None:
    """Refuse NaN and infinities.

    The fast path is the values' sum in numpy, one thread: it is finite only if every value is
    (IEEE arithmetic: an infinite or NaN term makes every partial sum that includes it
    non-finite, in any summation order). Only a sum that overflows, a refusal, and bfloat16
    (which numpy lacks) count the values one by one. Not torch's reductions: their threads wait
    on a core that numpy's BLAS threads (the norm check's products) still spin on, measured 3-4x
    slower on the 2-core machine after a product than before it.
    """
    if tensor.numel() == 0:
        return
    if tensor.dtype != torch.bfloat16:
        with np.errstate(over="ignore", invalid="ignore"):  # what the sum says is the point
            if math.isfinite(float(np.sum(tensor.numpy()))):
                return
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise PayloadError(f"tensor {name!r}: {bad} of {tensor.numel()} values are NaN or infinite")


def _check_file_finite(path: Path, header: Header) -> None:
    """Check every tensor of a validated file finite, one element-aligned piece at a time, in a
    mapping of the file: the pieces are views of the OS's cached pages, not reads into a buffer
    (the reads' copies were half of the check: 256 MiB 0.032 -> 0.017 s)."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        # No tensor of the mapping may outlive this block (closing it would fail): a refusal's
        # message leaves the loop, not its exception, whose frames hold the piece.
        refusal = _first_refusal(mapped, header)
    if refusal is not None:
        raise PayloadError(refusal)


def _first_refusal(mapped: mmap.mmap, header: Header) -> str | None:
    data_start = 8 + struct.unpack_from("<Q", mapped)[0]
    for name, info in sorted(header.tensors.items(), key=lambda item: item[1].start):
        dtype, size = ALLOWED_DTYPES[info.dtype]
        start, end = data_start + info.start, data_start + info.end
        if end > len(mapped):
            return f"tensor {name!r}: the file ends before its data does"
        step = _CHECK_BLOCK - _CHECK_BLOCK % size
        for offset in range(start, end, step):
            try:
                _check_finite(name, torch.frombuffer(mapped, dtype=dtype, count=min(step, end - offset) // size,
                                                     offset=offset))
            except PayloadError as err:
                return str(err)
    return None
