"""Noisy releases that left the server outside a committed round, recorded before they leave.

Under differential privacy with secure aggregation, pass 1 of a sketched round ends at the
server: it adds N1 to the unmasked sum Y and sends every active client Q = orth(Y + N1) for
pass 2. If the attempt then fails (a client lost before its pass-2 input, a saved attempt not to
be trusted, a failed aggregation) the round is retried with a fresh sample, and that Q has been
released all the same: one Gaussian mechanism of multiplier sigma on the failed attempt's sample.
Nothing else leaves the server before its round commits: ffa's and the dense release's one pass,
and every round of a plain DP run, are computed, written and committed before any client can see
them, and an attempt that fails before Q is sent has released nothing.

So each such Q is recorded here first (write-ahead: durable before the first client can fetch
it), one line per (round, attempt) in ``dp_releases.jsonl`` next to ``history.jsonl``. The
privacy budget counts every line whose attempt did not commit (a committed attempt's pass 1 is
one of its round's passes). The file is rewritten whole through a temporary file, fsync and rename
(``write_atomic``), so after a crash it holds every line recorded before. A restart that resumes
the attempt sends the same Q again (saved with the attempt by ``secure_state``): its line is
there already, and a (round, attempt) is never recorded twice. A fresh attempt draws a fresh Q,
and has a line of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flora.common.chunks import write_atomic

PASS_ONE_MECHANISMS = 1  # Q comes from pass 1 alone: one Gaussian mechanism


class ReleaseFileError(ValueError):
    """``dp_releases.jsonl`` cannot be read: the budget would be short of what was released."""


class Release(BaseModel):
    """One noisy release outside a commit: its attempt, the sample it was drawn on, how many Gaussian
    mechanisms it released, and the epsilon spent once it was (committed rounds and releases so far)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    round: int = Field(ge=1)
    attempt: int = Field(ge=1)
    population: int = Field(ge=1)
    selected: int = Field(ge=1)
    mechanisms: int = Field(ge=1, le=2)
    dp_epsilon: float = Field(ge=0.0)
    dp_delta: float = Field(gt=0.0, lt=1.0)
    released_unix: float

    @model_validator(mode="after")
    def _sample(self) -> Release:
        if self.selected > self.population:
            raise ValueError(f"selected {self.selected} is above population {self.population}")
        return self

    @property
    def key(self) -> tuple[int, int]:
        """(round, attempt): at most one release of each, the one a commit of that attempt supersedes."""
        return self.round, self.attempt


def outside_commits(releases: Sequence[Release], rounds: Sequence[Mapping[str, Any]]) -> list[Release]:
    """The releases whose attempt did not commit: a committed attempt's pass 1 is one of the
    passes its history line (``round``, ``attempts``) already accounts."""
    committed = {(r["round"], r.get("attempts")) for r in rounds}
    return [r for r in releases if r.key not in committed]


def read_releases(path: Path) -> list[Release]:
    """Every recorded release, oldest first ([] when there is no file). A line that is not a
    release is refused naming it: an unreadable record must never shrink the spent budget."""
    if not path.exists():
        return []
    releases = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            releases.append(Release.model_validate_json(line))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the line"
            raise ReleaseFileError(f"{path}: line {number} is not a differential privacy release record ({where}: "
                                   f"{first['msg']}); restore it from a backup, the budget cannot be accounted "
                                   "without it") from None
    return releases


def record_release(path: Path, release: Release) -> Release:
    """Add ``release`` durably (on disk when this returns; blocking). Returns the release stored
    for its (round, attempt): the one recorded before, when there is one, unchanged."""
    releases = read_releases(path)
    if (earlier := next((r for r in releases if r.key == release.key), None)) is not None:
        return earlier
    write_atomic(path, "".join(r.model_dump_json() + "\n" for r in [*releases, release]).encode())
    return release
