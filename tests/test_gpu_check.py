"""bench/gpu_check.py's CPU half and bench/precision.py run in CI (smoke sizes), so neither rots before a GPU is lent.

It measures nothing here; the assertions check that every check of the CPU half ran and passed
and that the results have the shape bench/README.md describes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_half_passes_every_check_and_reports_the_table(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["devices"] == ["cpu"] and report["smoke"]
    checks = {r["check"] for r in report["rows"]}
    assert {"server merge (max error / max weight)", "4-bit forward vs dequantized + update (relative)",
            "client round, run twice (max difference)", "4-bit round: model changed afterwards (relative)"} <= checks
    assert all(r["ok"] for r in report["rows"])
    assert "| check" in result.stdout and "checks ok" in result.stdout


def test_the_precision_benchmark_holds_nf4_under_the_memory_target(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.train", "--precisions", "bf16,nf4", "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["precision"]: r for r in json.loads((tmp_path / "precision.json").read_text())["rows"]}
    assert set(rows) == {"bf16", "nf4"} and rows["bf16"]["linear x bf16"] == 1
    # Byte counts, not timings: the quantized layers' weights and scales against their bf16 twins.
    assert 0 < rows["nf4"]["linear x bf16"] <= 0.4
    assert rows["nf4"]["tokens/s"] > 0 and rows["nf4"]["peak MiB"] > 0
    assert "| shape" in result.stdout
