"""Parsing and checking a safetensors header before any tensor byte is interpreted.

Every payload that crosses the network is untrusted (DESIGN.md section 7), so the length prefix,
the JSON header, the dtypes, the byte layout, the tensor names and the shapes are checked here,
with explicit limits, before the safetensors library sees the payload. ``flora.common.payload``
builds its readers on these checks.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from flora.common.chunks import source_size
from flora.common.payload_meta import PayloadError

# safetensors dtype name -> (torch dtype, bytes per element). Integer and float64 payloads have
# no business in a LoRA exchange, and refusing them keeps the loader's surface small.
ALLOWED_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
DTYPE_NAMES = {dtype: name for name, (dtype, _) in ALLOWED_DTYPES.items()}
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class PayloadLimits:
    """Upper bounds checked before any payload byte is interpreted as a tensor."""

    max_bytes: int = 1 << 31
    max_header_bytes: int = 8 << 20
    max_rank: int = 1 << 16


def artifact_limits(size: int, shapes: Mapping[str, tuple[int, int]]) -> PayloadLimits:
    """Limits for reading back an artifact the server wrote itself, following from the run.

    A stacked global adapter has rank sum r_k over the round's clients, which may pass the
    per-client ``max_rank``; its own size bounds it instead: every unit of rank costs at least
    2 bytes per row of A and column of B in every module.
    """
    per_rank = 2 * sum(d_in + d_out for d_out, d_in in shapes.values())
    return PayloadLimits(max_bytes=max(size, 8), max_rank=max(1, size // max(per_rank, 1)))


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


def read_header(source: bytes | Path, limits: PayloadLimits) -> Header:
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


def _parse_header(raw: bytes, data_len: int) -> Header:
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
    return Header(metadata, tensors)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """JSON allows repeated keys and parsers disagree on which wins; a payload may not use them."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise PayloadError(f"header repeats the key {duplicate!r}")
    return result


def _tensor_info(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
        raise PayloadError(f"tensor {name!r}: entry must be an object with exactly {sorted(_TENSOR_KEYS)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ALLOWED_DTYPES:
        raise PayloadError(f"tensor {name!r}: dtype {dtype!r} is not allowed (allowed: {allowed_dtypes()})")
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
    return TensorInfo(dtype, tuple(shape), start, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(tensors: Mapping[str, TensorInfo], data_len: int) -> None:
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


def check_names(tensors: Mapping[str, TensorInfo], expected: set[str]) -> None:
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


def check_adapter_names(tensors: Mapping[str, TensorInfo], expected: Mapping[str, tuple[int, int]], with_a: bool) -> None:
    """Exactly ``<module>.lora_B``, and ``<module>.lora_A`` unless A is frozen (``with_a`` False).

    The factor set follows from the run's method (FFA-LoRA uploads B alone): a factor of the
    wrong set is named with that rule, before the general unexpected/missing check.
    """
    a_names = sorted(f"{m}.lora_A" for m in expected)
    if not with_a and (present := [n for n in a_names if n in tensors]):
        raise PayloadError(
            f"unexpected tensor {present[0]!r} ({len(present)} lora_A in all): this run's updates hold lora_B only "
            "(A stays frozen at the global LoRA's leading rows)"
        )
    if with_a and (absent := [n for n in a_names if n not in tensors]) and any(f"{m}.lora_B" in tensors for m in expected):
        raise PayloadError(
            f"missing tensor {absent[0]!r} ({len(absent)} lora_A missing in all): this run's updates hold lora_A and lora_B"
        )
    check_names(tensors, {f"{m}.lora_{side}" for m in expected for side in ("AB" if with_a else "B")})


def check_adapter_shapes(
    tensors: Mapping[str, TensorInfo],
    expected: Mapping[str, tuple[int, int]],
    rank: int | None,
    limits: PayloadLimits,
    with_a: bool = True,
) -> int:
    """Check every A (r, d_in) and B (d_out, r) against one rank r; return r (B alone without A)."""
    modules = sorted(expected)
    sides = "AB" if with_a else "B"
    for module in modules:
        for side in sides:
            name = f"{module}.lora_{side}"
            if len(tensors[name].shape) != 2:
                raise PayloadError(f"tensor {name!r}: shape {tensors[name].shape} is not 2-D")
    if rank is None:
        first = f"{modules[0]}.lora_{sides[0]}"
        rank, source = tensors[first].shape[0 if with_a else 1], f"the rank of {first!r}"
    else:
        source = "the declared rank"
    if not 1 <= rank <= limits.max_rank:
        raise PayloadError(f"rank {rank} ({source}) is outside [1, {limits.max_rank}]")
    for module in modules:
        d_out, d_in = expected[module]
        if with_a:
            check_shape(f"{module}.lora_A", tensors, (rank, d_in), "(rank, in_features)", source)
        check_shape(f"{module}.lora_B", tensors, (d_out, rank), "(out_features, rank)", source)
    return rank


def check_update_shapes(
    tensors: Mapping[str, TensorInfo], expected: Mapping[str, tuple[int, int]], limits: PayloadLimits
) -> dict[str, str]:
    """Check a downlink update: per module either ``delta`` (d_out, d_in) or ``lora_A`` (r, d_in) and
    ``lora_B`` (d_out, r) with 1 <= r <= min(d_out, d_in, max_rank); return each module's form."""
    allowed = {f"{m}.{suffix}" for m in expected for suffix in ("lora_A", "lora_B", "delta")}
    if unknown := sorted(set(tensors) - allowed):
        raise PayloadError(f"unexpected tensor {unknown[0]!r} ({len(unknown)} unexpected in all)")
    forms = {}
    for module in sorted(expected):
        d_out, d_in = expected[module]
        factors = [f"{module}.lora_{side}" in tensors for side in "AB"]
        if f"{module}.delta" in tensors:
            if any(factors):
                raise PayloadError(f"module {module!r}: both a dense delta and factors; a module has one form")
            check_shape(f"{module}.delta", tensors, (d_out, d_in), "(out_features, in_features)")
            forms[module] = "dense"
            continue
        if not all(factors):
            missing = f"{module}.lora_{'AB'[factors.index(False)]}"
            raise PayloadError(f"missing tensor {missing!r} (module {module!r} needs lora_A and lora_B, or delta)")
        a_shape = tensors[f"{module}.lora_A"].shape
        if len(a_shape) != 2:
            raise PayloadError(f"tensor {module + '.lora_A'!r}: shape {a_shape} is not 2-D")
        rank = a_shape[0]
        if not 1 <= rank <= min(d_out, d_in, limits.max_rank):
            raise PayloadError(
                f"tensor {module + '.lora_A'!r}: rank {rank} is outside [1, {min(d_out, d_in, limits.max_rank)}] "
                "(a canonical factor rank never exceeds min(out_features, in_features))"
            )
        check_shape(f"{module}.lora_A", tensors, (rank, d_in), "(rank, in_features)")
        check_shape(f"{module}.lora_B", tensors, (d_out, rank), "(out_features, rank)", "the rank of lora_A")
        forms[module] = "factors"
    return forms


def check_shape(
    name: str, tensors: Mapping[str, TensorInfo], want: tuple[int, int], labels: str, note: str = ""
) -> None:
    got = tensors[name].shape
    if got != want:
        suffix = f" ({note})" if note else ""
        raise PayloadError(f"tensor {name!r}: shape {got} does not match {labels} = {want}{suffix}")


def allowed_dtypes() -> str:
    return ", ".join(sorted(ALLOWED_DTYPES))
