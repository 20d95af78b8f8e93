"""Supervising real flora processes on this machine: start, watch logs, stop, never leak.

The demo runs the same programs a deployment runs (``flora-server``, ``flora-client``), each in
its own process group with its log in a file, so that Ctrl-C, an exception or a crash of the
launcher itself still takes every child down with it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+)")


@dataclass
class Child:
    """One supervised process and the file its output goes to."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the child's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Supervisor:
    """Starts children and guarantees they are gone when the ``with`` block ends."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def __enter__(self) -> Supervisor:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(self, name: str, module: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        """Run ``python -P -m module args...`` in a new process group, output to ``<log_dir>/<name>.log``.

        ``-P`` keeps the working folder off the child's ``sys.path``: started from a folder that
        holds a ``flora`` directory (a clone next to the user's files), ``-m`` alone would import
        that folder instead of the installed package.
        """
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-P", "-m", module, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 10.0) -> int | None:
        """SIGTERM the child's group, then SIGKILL it after ``grace`` seconds; return the exit code."""
        _signal_group(child.process, signal.SIGTERM)
        try:
            return child.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(child.process, signal.SIGKILL)
            return child.process.wait()
        finally:
            # Grandchildren (none today) would share the group: make sure none outlive the child.
            _signal_group(child.process, signal.SIGKILL)

    def stop_all(self, grace: float = 10.0) -> None:
        """Stop every child, clients before the server that was started first."""
        for child in reversed(self.children):
            if child.alive():
                self.stop(child, grace)
            else:
                _signal_group(child.process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_port(child: Child, timeout: float) -> int:
    """The port from the child's ``listening on HOST:PORT`` log line, waiting up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = LISTENING.search(child.log_path.read_text(errors="replace"))
        if match:
            return int(match["port"])
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with code {child.process.returncode} before listening:\n{child.log_tail()}")
        time.sleep(0.1)
    raise TimeoutError(f"{child.name} did not log 'listening on' within {timeout:.0f} s:\n{child.log_tail()}")
