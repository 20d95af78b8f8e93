"""bench.secagg_prg runs end to end in its smoke mode (its numbers mean nothing here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_secagg_bench_smoke_reports_prg_throughput_and_each_stage(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bench.secagg_prg", "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "secagg_prg.json").read_text())
    assert [r["what"] for r in report["prg"]][0] == "raw AES-256-CTR (baseline)"
    assert all(r["MB_per_s"] > 0 for r in report["prg"])
    assert [(r["K"], r["dropped"]) for r in report["rounds"]] == [(3, 0), (3, 1), (5, 0), (5, 1)]
    assert all(r["up_vs_plain"] > 1 for r in report["rounds"])  # the masked vector plus keys and shares
    assert {r["stage"] for r in report["stages"]} == {"advertise", "share", "mask", "unmask"}
    assert "| K" in result.stdout


@pytest.mark.slow
def test_secagg_round_smoke_compares_secure_and_plain_and_the_dense_downlink_matches_plain(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bench.secagg_round", "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "secagg_round.json").read_text())["rows"]
    assert [(r["K"], r["passes"], r["dense"]) for r in rows] == [(3, 2, "0/2"), (10, 1, "2/2")]
    for row in rows:
        assert row["up_MB"] > row["plain_up_MB"] > 0 and row["wall_s"] > 0 and row["plain_wall_s"] > 0
        assert row["client_s"] >= row["client_mask_s"] > 0 and row["server_s"] >= row["server_unmask_s"] > 0
        assert row["persist_before_s"] > 0 and row["persist_after_s"] > 0
    dense = rows[1]  # its sum reaches the downlink as plain's stack does, no longer as the dense matrix
    assert dense["update_down_MB"] == dense["plain_down_MB"] < dense["update_down_before_MB"]
    assert "target at K = 10 (256)" in result.stdout and "| wall_s" in result.stdout
