"""The benchmark scripts run end to end in their smoke mode, so that they cannot rot.

They measure nothing here (tiny sizes, a loaded CI machine); the assertions check that each
writes complete results in the shape its README describes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_bench(module: str, out: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_aggregate_smoke_reports_every_k_and_a_linear_fit(tmp_path):
    stdout = run_bench("bench.aggregate", tmp_path)
    report = json.loads((tmp_path / "aggregate.json").read_text())
    assert [row["K"] for row in report["rows"]] == [2, 5]
    for row in report["rows"]:
        assert row["stack_s"] > 0 and row["merge_s"] > 0 and row["read_GBps"] > 0
        assert row["factorize_s"] > 0 and row["downlink_sent_MB"] > 0
        assert row["warm_grouped_s"] > 0 and row["warm_per_client_s"] > 0
    assert report["rows"][0]["householder_s"] > 0  # K = 2: R = 12 < d / 2, the SVD path is timed
    assert [row["K"] for row in report["downlink"]] == [2, 5, 40]  # the last one by byte counts only
    for row in report["downlink"]:
        exact = row["downlink_exact_MB"]
        assert exact == min(row["downlink_canonical_MB"], row["downlink_dense_MB"]) <= row["downlink_stacked_MB"]
        assert row["downlink_e0.95_MB"] <= row["downlink_e0.99_MB"] <= exact
    assert "r2" in report["merge_fit"] and report["machine"]["torch"]
    assert (tmp_path / "aggregate.png").read_bytes()[:4] == b"\x89PNG"
    assert "| K" in stdout


def test_train_smoke_compares_against_a_plain_peft_loop(tmp_path):
    stdout = run_bench("bench.train", tmp_path)
    report = json.loads((tmp_path / "train.json").read_text())
    assert set(report["median_tokens_per_second"]) == {"train_lora", "plain_peft"}
    assert report["ratio"] > 0
    assert "ratio train_lora / plain_peft" in stdout


def test_uploadmem_smoke_measures_the_baseline_and_the_default_setting(tmp_path):
    stdout = run_bench("bench.uploadmem", tmp_path)
    report = json.loads((tmp_path / "uploadmem.json").read_text())
    rows = report["rows"]
    assert [(r["allocator"], r["window"]) for r in rows] == [
        ("glibc defaults", "grpc's own"), ("server tuning", "fixed 1 MiB (default)")  # the baseline and the default
    ]
    for row in rows:
        assert row["clients"] == 3 and row["payload_MiB"] > 1.5  # every upload went through (else the bench raises)
        assert row["rss_peak_MiB"] >= row["rss_before_MiB"] > 0 and row["seconds"] > 0
        assert row["in_flight_MiB"] == pytest.approx(3 * row["payload_MiB"])
    assert "growth_per_client_chunks" in stdout


def test_secagg_plan_smoke_reports_bytes_against_plain_flora_and_the_plan_seconds(tmp_path):
    stdout = run_bench("bench.secagg_plan", tmp_path)
    rows = json.loads((tmp_path / "secagg_plan.json").read_text())["rows"]
    assert [(r["K"], r["passes"]) for r in rows] == [(3, 2), (10, 1)]  # sketched at K = 3, dense at K = 10
    for row in rows:
        assert row["secure_up_MB"] > row["plain_up_MB"] > 0 and row["up_ratio"] > 1
        assert row["client_s"] > 0 and row["server_s"] > 0
    assert rows[0]["q_down_MB"] > 0 and rows[1]["q_down_MB"] == 0
    assert "no masking cost" in stdout
