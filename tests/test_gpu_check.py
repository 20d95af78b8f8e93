"""bench/gpu_check.py's CPU half runs in CI (smoke sizes), so the script is ready the day a GPU is lent.

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
            "client round, run twice (max difference)", "4-bit round: model changed afterwards (max)"} <= checks
    assert all(r["ok"] for r in report["rows"])
    assert "| check" in result.stdout and "checks ok" in result.stdout
