"""LoRA factors and merged module weights as safetensors payloads, validated before loading.

Every payload that crosses the network is untrusted (DESIGN.md section 7). ``read_adapter`` and
``read_weights`` therefore parse the safetensors header themselves, with explicit limits, and
check the tensor names, dtypes, shapes and byte layout against what the run expects before the
safetensors library sees a single byte; only then are tensors loaded, and every value is checked
finite. Nothing here ever unpickles. Tensor names are ``<module>.lora_A`` (r, d_in) and
``<module>.lora_B`` (d_out, r) for adapters, ``<module>.weight`` (d_out, d_in) for merged weights.
"""

from __future__ import annotations

import json
import math
import secrets
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from torch import Tensor

from flora.common.chunks import file_sha256, fsync_file, publish, source_size
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.payload_meta import PayloadError, PayloadMeta

# safetensors dtype name -> (torch dtype, bytes per element). Integer and float64 payloads have
# no business in a LoRA exchange, and refusing them keeps the loader's surface small.
ALLOWED_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
_DTYPE_NAMES = {dtype: name for name, (dtype, _) in ALLOWED_DTYPES.items()}
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class PayloadLimits:
    """Upper bounds checked before any payload byte is interpreted as a tensor."""

    max_bytes: int = 1 << 31
    max_header_bytes: int = 8 << 20
    max_rank: int = 1 << 16


@dataclass(frozen=True)
class _TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class _Header:
    metadata: dict[str, str]
    tensors: dict[str, _TensorInfo]


def encode_adapter(adapter: LoraAdapter, meta: PayloadMeta, dtype: torch.dtype | None = None) -> bytes:
    """Serialize an adapter in memory, e.g. to upload it without touching the disk."""
    return _canonical_bytes(save_bytes(_adapter_tensors(adapter, meta, dtype), metadata=meta.to_metadata()))


def write_adapter(
    path: Path, adapter: LoraAdapter, meta: PayloadMeta, dtype: torch.dtype | None = None
) -> tuple[int, str]:
    """Write an adapter file atomically and return its (size, hex sha256) for the wire header."""
    tensors = _adapter_tensors(adapter, meta, dtype)
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
) -> tuple[LoraAdapter, PayloadMeta]:
    """Validate and load an adapter payload for the modules ``expected`` maps to (d_out, d_in).

    ``rank`` is the rank the sender declared elsewhere (e.g. in the upload header); ``scaling``
    is the caller's trusted scaling, which wins over the payload's own metadata.
    """
    header = _read_header(source, limits)
    meta = PayloadMeta.from_metadata(header.metadata)
    if not meta.is_adapter:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} is not an adapter payload")
    _check_names(header.tensors, {f"{m}.lora_{side}" for m in expected for side in "AB"})
    found = _check_adapter_shapes(header.tensors, expected, rank, limits)
    if meta.rank != found:
        raise PayloadError(f"metadata 'rank': {meta.rank} does not match the tensors' rank {found}")
    tensors = _load(source, header)
    pairs = {m: LoraPair(tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]) for m in sorted(expected)}
    return LoraAdapter(pairs, meta.scaling if scaling is None else scaling), meta


def read_weights(
    source: bytes | Path,
    expected: Mapping[str, tuple[int, int]],
    *,
    limits: PayloadLimits = PayloadLimits(),
) -> tuple[dict[str, Tensor], PayloadMeta]:
    """Validate and load merged weights, returned by module name (without ``.weight``)."""
    header = _read_header(source, limits)
    meta = PayloadMeta.from_metadata(header.metadata)
    if meta.is_adapter:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} is not a merged-weights payload")
    _check_names(header.tensors, {f"{m}.weight" for m in expected})
    for module, (d_out, d_in) in sorted(expected.items()):
        _check_shape(f"{module}.weight", header.tensors, (d_out, d_in), "(out_features, in_features)")
    tensors = _load(source, header)
    return {m: tensors[f"{m}.weight"] for m in sorted(expected)}, meta


# --- encoding ---------------------------------------------------------------------------------


def _adapter_tensors(adapter: LoraAdapter, meta: PayloadMeta, dtype: torch.dtype | None) -> dict[str, Tensor]:
    if not meta.is_adapter:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} cannot describe a LoRA adapter")
    if meta.rank != adapter.rank:
        raise PayloadError(f"metadata 'rank': {meta.rank} does not match the adapter's rank {adapter.rank}")
    if not math.isclose(meta.scaling, adapter.scaling, rel_tol=1e-6):
        raise PayloadError(f"metadata 'scaling': {meta.scaling} does not match the adapter's {adapter.scaling}")
    tensors = {}
    for module in adapter.module_names:
        a, b = adapter.pairs[module]
        tensors[f"{module}.lora_A"] = _prepare(f"{module}.lora_A", a, dtype)
        tensors[f"{module}.lora_B"] = _prepare(f"{module}.lora_B", b, dtype)
    return tensors


def _weight_tensors(weights: Mapping[str, Tensor], meta: PayloadMeta, dtype: torch.dtype | None) -> dict[str, Tensor]:
    if meta.is_adapter:
        raise PayloadError(f"metadata 'kind': {meta.kind!r} cannot describe merged weights")
    if not weights:
        raise PayloadError("merged weights need at least one module")
    return {f"{m}.weight": _prepare(f"{m}.weight", weights[m], dtype) for m in sorted(weights)}


def _prepare(name: str, tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Cast to a wire dtype on the CPU; refuse what a reader would refuse, before writing it."""
    out = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    if out.dtype not in _DTYPE_NAMES:
        raise PayloadError(f"tensor {name!r}: dtype {out.dtype} is not allowed (allowed: {_allowed()})")
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


# --- header validation ------------------------------------------------------------------------


def _read_header(source: bytes | Path, limits: PayloadLimits) -> _Header:
    """Read just the length prefix and the header: a file's tensor bytes stay on disk."""
    total = source_size(source)
    if total < 8:
        raise PayloadError(f"payload is {total} bytes; a safetensors payload has at least 8")
    if total > limits.max_bytes:
        raise PayloadError(f"payload is {total} bytes; the limit is {limits.max_bytes}")
    if isinstance(source, Path):
        with open(source, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            _check_header_length(length, total, limits)
            raw = file.read(length)
    else:
        (length,) = struct.unpack("<Q", source[:8])
        _check_header_length(length, total, limits)
        raw = bytes(source[8 : 8 + length])
    return _parse_header(raw, data_len=total - 8 - length)


def _check_header_length(length: int, total: int, limits: PayloadLimits) -> None:
    if length > limits.max_header_bytes:
        raise PayloadError(f"header is {length} bytes; the limit is {limits.max_header_bytes}")
    if length > total - 8:
        raise PayloadError(f"header is {length} bytes but only {total - 8} follow the length prefix")


def _parse_header(raw: bytes, data_len: int) -> _Header:
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as err:
        raise PayloadError(f"header is not valid UTF-8: {err}") from None
    except (ValueError, RecursionError) as err:
        raise PayloadError(f"header is not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise PayloadError(f"header is a JSON {type(parsed).__name__}, not an object")
    metadata = parsed.pop("__metadata__", None)
    if not isinstance(metadata, dict):
        raise PayloadError("header '__metadata__' is missing or not an object")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise PayloadError(f"metadata {key!r}: value {value!r} is not a string")
    tensors = {name: _tensor_info(name, entry) for name, entry in parsed.items()}
    _check_layout(tensors, data_len)
    return _Header(metadata, tensors)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """JSON allows repeated keys and parsers disagree on which wins; a payload may not use them."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise PayloadError(f"header repeats the key {duplicate!r}")
    return result


def _tensor_info(name: str, entry: object) -> _TensorInfo:
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
        raise PayloadError(f"tensor {name!r}: entry must be an object with exactly {sorted(_TENSOR_KEYS)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ALLOWED_DTYPES:
        raise PayloadError(f"tensor {name!r}: dtype {dtype!r} is not allowed (allowed: {_allowed()})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise PayloadError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise PayloadError(f"tensor {name!r}: data_offsets {offsets!r} is not two non-negative integers")
    start, end = offsets
    needed = math.prod(shape) * ALLOWED_DTYPES[dtype][1]
    if end - start != needed:
        raise PayloadError(
            f"tensor {name!r}: data_offsets [{start}, {end}] hold {end - start} bytes "
            f"but shape {tuple(shape)} of {dtype} needs {needed}"
        )
    return _TensorInfo(dtype, tuple(shape), start, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(tensors: Mapping[str, _TensorInfo], data_len: int) -> None:
    """Tensors must tile the data region exactly, as safetensors itself requires."""
    position, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        after = f"after tensor {previous!r}" if previous else "at the start of the data region"
        if info.start < position:
            raise PayloadError(f"tensor {name!r}: data_offsets start at {info.start}, overlapping bytes {after}")
        if info.start > position:
            raise PayloadError(f"tensor {name!r}: data_offsets leave a gap of bytes [{position}, {info.start}) {after}")
        if info.end > data_len:
            raise PayloadError(f"tensor {name!r}: data_offsets end at {info.end}, past the {data_len}-byte data region")
        position, previous = info.end, name
    if position != data_len:
        raise PayloadError(f"the data region is {data_len} bytes but the tensors cover only {position}")


def _check_names(tensors: Mapping[str, _TensorInfo], expected: set[str]) -> None:
    if not expected:
        raise ValueError("expected: at least one module is required")
    unknown = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    problems = []
    if unknown:
        problems.append(f"unexpected tensor {unknown[0]!r} ({len(unknown)} unexpected in all)")
    if missing:
        problems.append(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if problems:
        raise PayloadError("; ".join(problems))


def _check_adapter_shapes(
    tensors: Mapping[str, _TensorInfo],
    expected: Mapping[str, tuple[int, int]],
    rank: int | None,
    limits: PayloadLimits,
) -> int:
    """Check every A (r, d_in) and B (d_out, r) against one rank r; return r."""
    modules = sorted(expected)
    for module in modules:
        for side in "AB":
            name = f"{module}.lora_{side}"
            if len(tensors[name].shape) != 2:
                raise PayloadError(f"tensor {name!r}: shape {tensors[name].shape} is not 2-D")
    if rank is None:
        rank, source = tensors[f"{modules[0]}.lora_A"].shape[0], f"the rank of {modules[0] + '.lora_A'!r}"
    else:
        source = "the declared rank"
    if not 1 <= rank <= limits.max_rank:
        raise PayloadError(f"rank {rank} ({source}) is outside [1, {limits.max_rank}]")
    for module in modules:
        d_out, d_in = expected[module]
        _check_shape(f"{module}.lora_A", tensors, (rank, d_in), "(rank, in_features)", source)
        _check_shape(f"{module}.lora_B", tensors, (d_out, rank), "(out_features, rank)", source)
    return rank


def _check_shape(
    name: str, tensors: Mapping[str, _TensorInfo], want: tuple[int, int], labels: str, note: str = ""
) -> None:
    got = tensors[name].shape
    if got != want:
        suffix = f" ({note})" if note else ""
        raise PayloadError(f"tensor {name!r}: shape {got} does not match {labels} = {want}{suffix}")


# --- loading ----------------------------------------------------------------------------------


def _load(source: bytes | Path, header: _Header) -> dict[str, Tensor]:
    """Load the validated tensors; a file goes through safe_open so that it is mmapped, not read."""
    try:
        if isinstance(source, Path):
            with safe_open(source, framework="pt", device="cpu") as file:
                tensors = {name: file.get_tensor(name) for name in header.tensors}
        else:
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
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise PayloadError(f"tensor {name!r}: {bad} of {tensor.numel()} values are NaN or infinite")


def _allowed() -> str:
    return ", ".join(sorted(ALLOWED_DTYPES))
