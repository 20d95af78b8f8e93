"""bench/quality.py --smoke runs end to end and reports every method, seed and round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flora.common.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
EQUAL = {f"{m}-equal" for m in METHODS if m != "zeropad"} | {"centralized-equal"}
MIXED = {f"{m}-mixed" for m in METHODS if m != "fedit"}


@pytest.mark.slow
def test_quality_smoke_reports_every_method_seed_and_round(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--smoke", "--workers", "2", "--first-seed", "3", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "quality.json").read_text())
    settings = report["settings"]
    assert set(report["experiments"]) == EQUAL | MIXED
    for label, experiment in report["experiments"].items():
        rounds = settings["long_rounds"] if label in settings["long_runs"] else settings["rounds"]
        history = experiment["history"]
        assert sorted((r["seed"], r["round"]) for r in history) == [(s, t) for s in (3, 4) for t in range(rounds + 1)], label
        assert all(r["validation_loss"] > 0 for r in history), label
        if METHODS.get(experiment["method"]) is not None and METHODS[experiment["method"]].exact:
            assert all(r["aggregation_error"] < 1e-6 for r in history if r["round"] > 0), label
    assert {row["method"] for row in report["summary"]} == set(METHODS) | {"centralized"}
    assert all(row["best exact"] in METHODS and row["lower in"].endswith("/2 seeds") for row in report["paired"])
    for setting in ("equal", "mixed"):
        assert (tmp_path / f"quality-{setting}.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "quality-runs.jsonl").read_text().splitlines()) == 2 * len(EQUAL | MIXED)
    assert " ± " in result.stdout and "Paired differences" in result.stdout
