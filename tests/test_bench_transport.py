"""bench/transport.py --smoke runs end to end against the real server and reports every size both ways.

No timing assertions: numbers depend on the machine; the benchmark itself reports them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SIZES = [1.0, 2.0]


@pytest.mark.slow
def test_transport_smoke_reports_both_directions_for_every_size(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.transport", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "transport.json").read_text())
    rows = report["rows"]
    assert sorted((r["size_MiB"], r["direction"]) for r in rows) == sorted(
        (size, direction) for size in SMOKE_SIZES for direction in ("upload", "download")
    )
    for row in rows:
        label = f"{row['size_MiB']} MiB {row['direction']}"
        if row["direction"] == "upload":
            assert row["payload_bytes"] > 0.9 * row["size_MiB"] * (1 << 20), label
        else:  # the global update: one client's sum, in whichever exact form is smaller, never larger than the stack
            upload = next(r for r in rows if r["size_MiB"] == row["size_MiB"] and r["direction"] == "upload")
            assert 0 < row["payload_bytes"] <= upload["payload_bytes"], label
        for key in ("grpc_MBps", "raw_MBps", "raw_mem_MBps", "ratio"):
            assert row[key] > 0, f"{label}: {key} = {row[key]}"
        assert row["rss_peak_MB"] >= row["rss_before_MB"] > 0, label
    assert all(s["payload_bytes"] > 0 and s["down_s"] > 0 for s in report["samples"])
    assert (tmp_path / "transport.png").read_bytes()[:4] == b"\x89PNG"
    assert "| size_MiB | direction |" in result.stdout
