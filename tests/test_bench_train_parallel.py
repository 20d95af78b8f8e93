"""bench.train_parallel runs in smoke mode: 2-process gloo groups (whole and FSDP) against one process, same batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_parallel_smoke_times_every_side_and_the_groups_match(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.train_parallel", "--smoke", "--threads", "1", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "train_parallel.json").read_text())
    assert set(report["median_tokens_per_second"]) == {"1 process", "2 processes", "2 processes, FSDP"}
    assert all(rate > 0 for rate in report["median_tokens_per_second"].values())
    assert set(report["relative_distance_b"]) == set(report["relative_distance_a"]) == {"2 processes", "2 processes, FSDP"}
    assert all(d < 1e-4 for d in report["relative_distance_b"].values())
    assert all(d < 1e-5 for d in report["relative_distance_a"].values())
    assert "| training" in result.stdout
