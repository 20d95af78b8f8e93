"""bench.quality --bases: runs on quantized client bases are compared with full precision, seed by seed.

The verdict the issue asks for (is the 4-bit run within the full-precision run's spread over
seeds?) is computed from the recorded histories, and a runs file read back keeps each run's bases.
"""

from __future__ import annotations

import json

from bench.quality import load_runs
from bench.quality_report import base_comparisons, comparisons
from flora.sim.engine import RoundRecord


def records(label_loss: dict[int, float], method: str = "flora-warm") -> list[RoundRecord]:
    return [RoundRecord(method, 3, [0], [4], 4, loss, 1.0, 0.0, 1.0, seed) for seed, loss in label_loss.items()]


RUNS = {
    "flora-warm-equal": records({0: 1.00, 1: 1.02, 2: 1.04}),  # std 0.02
    "flora-warm:nf4-equal": records({0: 1.01, 1: 1.03, 2: 1.05}),  # +0.01: within
    "flora-warm:none+nf4-equal": records({0: 1.10, 1: 1.12, 2: 1.14}),  # +0.10: outside
}


def test_each_quantized_run_is_paired_with_full_precision_and_judged_by_its_seed_spread():
    rows = {row["run"]: row for row in base_comparisons(RUNS, [3])}
    assert set(rows) == {"flora-warm:nf4", "flora-warm:none+nf4"}
    assert rows["flora-warm:nf4"]["mean diff"] == "+0.0100" and rows["flora-warm:nf4"]["within spread"] == "yes"
    assert rows["flora-warm:none+nf4"]["higher in"] == "3/3 seeds" and rows["flora-warm:none+nf4"]["within spread"] == "no"
    assert rows["flora-warm:nf4"]["seed spread"] == "0.0200"


def test_quantized_runs_stay_out_of_the_methods_comparison():
    assert comparisons(RUNS, [3]) == []  # one plain method: nothing to compare it with


def test_a_runs_file_read_back_keeps_each_runs_bases(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps({"label": label, "mmlu_accuracy": None, "history": [r.to_json() for r in rs]}) + "\n"
                            for label, rs in RUNS.items()))
    plan, runs, _ = load_runs(path)
    assert {e.label: e.bases for e in plan} == {"flora-warm-equal": "none", "flora-warm:nf4-equal": "nf4",
                                                "flora-warm:none+nf4-equal": "none+nf4"}
    assert all(e.downlink == "exact" for e in plan)
