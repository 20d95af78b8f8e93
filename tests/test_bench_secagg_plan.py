"""bench/secagg_plan.py runs end to end in its smoke mode and reports what its README row says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_secagg_plan_smoke_reports_bytes_against_plain_flora_and_the_plan_seconds(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.secagg_plan", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "secagg_plan.json").read_text())["rows"]
    assert [(r["K"], r["passes"]) for r in rows] == [(3, 2), (10, 1)]  # sketched at K = 3, dense at K = 10
    for row in rows:
        assert row["secure_up_MB"] > row["plain_up_MB"] > 0 and row["up_ratio"] > 1
        assert row["client_s"] > 0 and row["server_s"] > 0
    assert rows[0]["q_down_MB"] > 0 and rows[1]["q_down_MB"] == 0
    assert "no masking cost" in result.stdout
