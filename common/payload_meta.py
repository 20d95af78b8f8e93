"""What a payload says about itself: the safetensors ``__metadata__`` of flora payloads.

safetensors metadata is a flat string-to-string map, so every field is written in one canonical
text form and parsed back strictly: a reader rejects unknown keys, missing keys, non-numeric
numbers and a scaling that does not follow from rank, alpha and the scaling rule, each with the
key named. ``flora.common.payload`` validates the tensors; this module validates the words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from flora.common.lora import lora_scaling

ADAPTER_FORMAT = "flora.lora.v1"
WEIGHTS_FORMAT = "flora.weights.v1"
UPDATE_FORMAT = "flora.update.v1"
# "global_adapter" (the stacked adapter) is what servers before the canonical downlink stored.
ADAPTER_KINDS = ("client_update", "global_adapter", "global_lora")
WEIGHTS_KINDS = ("merged_modules",)
# A round's downlink (per module canonical factors or a dense delta) and the lossy remainder.
UPDATE_KINDS = ("global_update", "downlink_remainder")
SCALING_RULES = ("standard", "rslora")
KINDS = ADAPTER_KINDS + WEIGHTS_KINDS + UPDATE_KINDS

_ADAPTER_KEYS = frozenset({"format", "kind", "rank", "alpha", "scaling_rule", "scaling", "round", "version"})
_WEIGHTS_KEYS = frozenset({"format", "kind", "round", "version"})  # also those of update payloads
_COUNT = re.compile(r"[0-9]{1,19}")
# A decimal float as Python's repr writes one (8.0, 0.125, 1e-05, 1.5e+20): an optional minus,
# digits with an optional fraction, an optional exponent; no spaces, underscores, hex, inf or nan.
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class PayloadError(ValueError):
    """A payload (or its metadata) that breaks the format or a limit; the message names which."""


@dataclass(frozen=True)
class PayloadMeta:
    """The metadata of one payload; the adapter fields are None exactly for merged weights.

    ``scaling`` is derived from rank, alpha and the rule rather than stored, so that it cannot
    disagree with them; it is still written out for readers that only want the number. A
    stacked global adapter has every client's scaling folded into A already (DESIGN.md section
    2): describe it with ``alpha = rank`` and the standard rule, which gives scaling 1.
    """

    kind: str
    rank: int | None = None
    alpha: float | None = None
    scaling_rule: str | None = None
    round: int | None = None
    version: int | None = None

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        for key in ("round", "version"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise PayloadError(f"metadata {key!r}: {value} is negative")
        fields = {k: getattr(self, k) for k in ("rank", "alpha", "scaling_rule")}
        if not self.is_adapter:
            if extra := [k for k, v in fields.items() if v is not None]:
                raise PayloadError(f"metadata {extra[0]!r} does not belong to a {self.kind!r} payload")
            return
        if missing := [k for k, v in fields.items() if v is None]:
            raise PayloadError(f"metadata {missing[0]!r} is missing (required for kind {self.kind!r})")
        if self.rank < 1:
            raise PayloadError(f"metadata 'rank': {self.rank} is not >= 1")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise PayloadError(f"metadata 'alpha': {self.alpha} is not a finite number > 0")
        _check_choice("scaling_rule", self.scaling_rule, SCALING_RULES)

    @property
    def is_adapter(self) -> bool:
        """True for LoRA factors, False for merged module weights."""
        return self.kind in ADAPTER_KINDS

    @property
    def is_update(self) -> bool:
        """True for a downlink update or remainder (per-module factors or dense deltas)."""
        return self.kind in UPDATE_KINDS

    @property
    def format(self) -> str:
        """The format tag, which follows from the kind."""
        return _format_of(self.kind)

    @property
    def scaling(self) -> float | None:
        """The adapter's LoRA scaling s (None for merged weights)."""
        if not self.is_adapter:
            return None
        return lora_scaling(self.rank, self.alpha, rslora=self.scaling_rule == "rslora")

    def to_metadata(self) -> dict[str, str]:
        """The canonical string map (floats as ``repr``, which round-trips exactly)."""
        out = {"format": self.format, "kind": self.kind}
        for key in ("rank", "alpha", "scaling_rule", "scaling", "round", "version"):
            value = getattr(self, key)
            if value is not None:
                out[key] = repr(float(value)) if key in ("alpha", "scaling") else str(value)
        return out

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> PayloadMeta:
        """Parse a payload's metadata strictly; every error names the key at fault."""
        kind = _check_choice("kind", _required(metadata, "kind"), KINDS)
        allowed = _ADAPTER_KEYS if kind in ADAPTER_KINDS else _WEIGHTS_KEYS
        fmt = _format_of(kind)
        if unknown := sorted(set(metadata) - allowed):
            raise PayloadError(f"metadata {unknown[0]!r} is not a {fmt} key for kind {kind!r}")
        if (found := _required(metadata, "format")) != fmt:
            raise PayloadError(f"metadata 'format': {found!r} is not {fmt!r} (the format of kind {kind!r})")
        meta = cls(
            kind,
            rank=_count(metadata, "rank"),
            alpha=_number(metadata, "alpha"),
            scaling_rule=metadata.get("scaling_rule"),
            round=_count(metadata, "round"),
            version=_count(metadata, "version"),
        )
        if meta.is_adapter:
            written = _number(metadata, "scaling")
            if written is None:
                raise PayloadError(f"metadata 'scaling' is missing (required for kind {kind!r})")
            if not math.isclose(written, meta.scaling, rel_tol=1e-6):
                raise PayloadError(
                    f"metadata 'scaling': {written} does not follow from rank {meta.rank}, "
                    f"alpha {meta.alpha} and the {meta.scaling_rule} rule ({meta.scaling})"
                )
        return meta


def _format_of(kind: str) -> str:
    if kind in ADAPTER_KINDS:
        return ADAPTER_FORMAT
    return UPDATE_FORMAT if kind in UPDATE_KINDS else WEIGHTS_FORMAT


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise PayloadError(f"metadata {key!r}: {value!r} is not one of {', '.join(choices)}")
    return value


def _required(metadata: Mapping[str, str], key: str) -> str:
    if key not in metadata:
        raise PayloadError(f"metadata {key!r} is missing")
    return metadata[key]


def _count(metadata: Mapping[str, str], key: str) -> int | None:
    """A non-negative integer written in plain digits (no sign, spaces or underscores)."""
    if key not in metadata:
        return None
    if not _COUNT.fullmatch(metadata[key]):
        raise PayloadError(f"metadata {key!r}: {metadata[key][:40]!r} is not a non-negative integer")
    return int(metadata[key])


def _number(metadata: Mapping[str, str], key: str) -> float | None:
    """A finite decimal float (``_DECIMAL``): not everything Python's ``float`` reads (' 8', '8_0')."""
    if key not in metadata:
        return None
    if not _DECIMAL.fullmatch(metadata[key]):
        raise PayloadError(f"metadata {key!r}: {metadata[key][:40]!r} is not a decimal number")
    value = float(metadata[key])
    if not math.isfinite(value):
        raise PayloadError(f"metadata {key!r}: {value} is not finite")
    return value
