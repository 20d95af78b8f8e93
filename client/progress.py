"""Progress of downloads, training steps and uploads: bars on a terminal, log lines elsewhere.

A daemon usually runs under systemd, docker or a CI job, where carriage-return bars turn into
megabytes of noise; there it reports progress as structured log lines at a bounded rate. When
stderr is a terminal (or ``--progress on``) it draws tqdm bars instead.
"""

from __future__ import annotations

import logging
import sys
import time
from abc import ABC, abstractmethod
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0


class Bar(ABC):
    """One activity's progress: ``update`` adds done units; ``close`` reports the end."""

    @abstractmethod
    def update(self, n: int = 1, **status: object) -> None:
        """Count ``n`` more units done; ``status`` (e.g. loss=...) is shown beside the count."""

    @abstractmethod
    def close(self) -> None:
        """Finish the bar (idempotent)."""

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _TerminalBar(Bar):
    def __init__(self, what: str, total: int, unit: str, stream: TextIO) -> None:
        scale = unit == "B"
        self._bar = tqdm(
            total=total, desc=what, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
            file=stream, dynamic_ncols=True, leave=False,
        )

    def update(self, n: int = 1, **status: object) -> None:
        if status:
            self._bar.set_postfix({k: _short(v) for k, v in status.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class _LogBar(Bar):
    """Log lines ``event=progress`` at most every LOG_INTERVAL_S, and one at the end."""

    def __init__(self, what: str, total: int, unit: str, interval: float = LOG_INTERVAL_S) -> None:
        self._what, self._total, self._unit, self._interval = what, total, unit, interval
        self._done = 0
        self._status: dict[str, object] = {}
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1, **status: object) -> None:
        self._done += n
        self._status.update(status)
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._emit("progress")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit("progress_end")

    def _emit(self, event: str) -> None:
        elapsed = time.monotonic() - self._start
        extra = "".join(f" {k}={_short(v)}" for k, v in self._status.items())
        log.info(
            "event=%s what=%s done=%d total=%d unit=%s elapsed_s=%.1f rate=%.1f%s",
            event, self._what, self._done, self._total, self._unit, elapsed, self._done / max(elapsed, 1e-9), extra,
        )


class Progress:
    """Makes bars of the configured kind: ``auto`` (terminal bars on a TTY), ``on`` or ``off``."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            self.terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        else:
            self.terminal = mode == "on"

    def bar(self, what: str, total: int, unit: str = "it") -> Bar:
        """A progress bar for ``what`` (e.g. "download v3", "train round 2"), ``total`` units."""
        if self.terminal:
            return _TerminalBar(what, total, unit, self.stream)
        return _LogBar(what, total, unit)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _BarSafeHandler(logging.StreamHandler):
    """Writes log lines through tqdm so that they do not tear a bar being drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise; the stdlib's own policy
            self.handleError(record)


def log_handler(progress: Progress) -> logging.Handler:
    """The stderr log handler that suits ``progress``: bar-safe when bars are drawn."""
    return _BarSafeHandler(progress.stream) if progress.terminal else logging.StreamHandler(progress.stream)
