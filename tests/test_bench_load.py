"""bench/load.py --smoke drives a real server with protocol-level clients through every call.

It measures nothing here (a handful of clients on a loaded CI machine); the assertions check that
every client ran every round with every call and no error, and that the results have the shape
bench/README.md describes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_load_smoke_runs_every_call_for_every_client_without_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.load", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "load.json").read_text())
    (row,) = report["rows"]
    clients, rounds = row["clients"], report["settings"]["rounds"]
    assert row["errors"] == 0, row["errors_by_code"]
    assert row["finished"] == clients and row["rounds_committed"] == rounds
    assert row["Join_count"] == clients
    assert row["SubmitUpdate_count"] == clients * rounds
    assert row["FetchGlobal_count"] == clients * (rounds - 1)  # round 1 trains from the base model
    assert row["Heartbeat_count"] > 0 and row["health_checks"] > 0 and row["health_p99_ms"] > 0
    assert row["fds_max"] > clients  # one connection per client, as real daemons have
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"
    assert "| clients | errors | health_p99_ms" in result.stdout
