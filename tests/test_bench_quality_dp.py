"""bench/quality_dp runs end to end in its smoke mode (it measures nothing here): every run of the
plan reports a finite loss, the DP runs a sigma from the accountant, and the sketch's downlink is
smaller than the dense release's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quality_dp_smoke_runs_no_dp_and_both_releases(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.quality_dp", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "quality-dp.json").read_text())
    runs = {r["release"]: r for r in report["runs"]}
    assert set(runs) == {"none", "sketch", "dense"}
    assert runs["none"]["sigma"] is None and runs["sketch"]["sigma"] > runs["dense"]["sigma"] > 0  # 2 passes cost more
    assert all(math.isfinite(r["validation_loss"]) for r in runs.values())
    assert runs["sketch"]["downlink_values"] < runs["dense"]["downlink_values"]
    assert "Held-out loss under client-level DP" in result.stdout
    (row,) = report["downlink_at_scale"]
    assert row["dense values"] == 96 * 64 and row["sketch values"] < row["dense values"]
