"""bench.train_parallel runs in smoke mode: a 2-process gloo group against one process, same batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_parallel_smoke_times_both_sides_and_the_group_matches(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.train_parallel", "--smoke", "--threads", "1", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "train_parallel.json").read_text())
    assert set(report["median_tokens_per_second"]) == {"1 process", "2 processes"}
    assert all(rate > 0 for rate in report["median_tokens_per_second"].values())
    assert report["relative_distance_b"] < 1e-4 and report["relative_distance_a"] < 1e-5
    assert "| training" in result.stdout
