"""The one exception of secure aggregation: which field was refused and why."""

from __future__ import annotations


class SecAggError(ValueError):
    """A message, key, share or stage request refused; raised before any state changed.

    ``field`` names what was wrong (e.g. ``public_key``, ``share``, ``survivors``) so that the
    gRPC layer can map it to a status message without showing Python exception text.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
