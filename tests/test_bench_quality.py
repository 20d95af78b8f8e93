"""bench/quality.py --smoke runs end to end and reports every method at every round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"centralized", "flora-homo", "fedit-homo", "flora-hetero", "zeropad-hetero"}


@pytest.mark.slow
def test_quality_smoke_reports_every_method_and_round(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "quality.json").read_text())
    rounds = report["settings"]["rounds"]
    assert set(report["experiments"]) == EXPERIMENTS
    for label, experiment in report["experiments"].items():
        history = experiment["history"]
        assert [r["round"] for r in history] == list(range(rounds + 1)), label
        assert all(r["validation_loss"] > 0 for r in history), label
        assert all(r["aggregation_error"] is not None for r in history[1:]), label
    for method in ("flora-homo", "flora-hetero"):
        assert all(r["aggregation_error"] < 1e-6 for r in report["experiments"][method]["history"][1:])
    assert [row["round"] for row in report["validation_loss_by_round"]] == list(range(rounds + 1))
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "| round | centralized | flora-homo" in result.stdout
