"""bench/quality_dp runs end to end in its smoke mode (it measures nothing here): every run of the
grid, at K and at K split further, reports a finite loss, the DP runs a sigma from the accountant,
and the sketch's downlink is smaller than the dense release's. The grid's pure parts (the split,
the plan's order, merging results files) are checked directly."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.quality_dp import main, module_set, plan, split
from bench.quality_dp_report import check_regime, grid_rows
from flora.sim.engine import ClientData

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_dp_smoke_runs_both_client_counts_and_releases(tmp_path, monkeypatch, capsys):
    result = subprocess.run([sys.executable, "-m", "bench.quality_dp", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "quality-dp.json").read_text())
    runs = {(r["clients"], r["release"]): r for r in report["runs"]}
    assert set(runs) == {(k, release) for k in (3, 6) for release in ("none", "sketch", "dense")}
    for k in (3, 6):
        assert runs[k, "none"]["sigma"] is None and runs[k, "sketch"]["sigma"] > runs[k, "dense"]["sigma"] > 0  # 2 passes cost more
        assert runs[k, "sketch"]["downlink_values"] < runs[k, "dense"]["downlink_values"]
    assert runs[3, "dense"]["sigma"] == runs[6, "dense"]["sigma"]  # every client every round: no amplification
    assert all(math.isfinite(r["validation_loss"]) for r in runs.values())
    assert "Held-out loss under client-level DP" in result.stdout
    model, single = report["downlink_at_scale"]
    assert model["modules"] == "model" and model["sketch bytes"] < model["dense bytes"]
    assert single["dense bytes"] == 4 * 96 * 64 and single["sketch bytes"] < single["dense bytes"]
    monkeypatch.setattr(sys, "argv", ["quality_dp", "--from-results", str(tmp_path / "quality-dp.json")])
    main()  # the table again, from the results file alone
    assert re.search(r"\| 6 +\| 6 +\| flora-warm \| sketch +\| 8 ", capsys.readouterr().out)


def test_split_deals_every_client_into_parts_keeping_the_union():
    clients = [ClientData(name, list(range(start, start + 7))) for name, start in (("a", 0), ("b", 100))]
    parts = split(clients, 3)
    assert [c.name for c in parts] == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert parts[1].train == [1, 4] and sorted(x for c in parts for x in c.train) == sorted(x for c in clients for x in c.train)
    assert split(clients, 3) == parts  # deterministic


def test_plan_runs_no_dp_and_the_largest_epsilon_of_every_method_first():
    args = argparse.Namespace(first_seed=0, seeds=1, methods=["flora-warm", "ffa"], releases=["sketch", "dense"],
                              epsilons=[1.0, 8.0], rounds=2, delta=1e-5, clients_per_round=None,
                              baseline=True)
    runs = plan(args, [10, 100])
    assert [(r.clients, r.method, r.release, r.epsilon) for r in runs if r.clients == 100][:5] == [
        (100, "flora-warm", "none", None), (100, "ffa", "none", None), (100, "flora-warm", "sketch", 8.0),
        (100, "flora-warm", "dense", 8.0), (100, "ffa", "b-sum", 8.0)]
    assert {r.clients for r in runs[:8]} == {10} and len(runs) == 2 * (1 + 4 + 1 + 2)
    assert all(r.sigma > 0 and r.per_round == r.clients for r in runs if r.epsilon is not None)
    args.clients_per_round = 10
    sampled = {(r.clients, r.release, r.epsilon): r for r in plan(args, [10, 100])}
    assert sampled[100, "dense", 8.0].per_round == 10 == sampled[10, "dense", 8.0].per_round
    assert sampled[100, "dense", 8.0].sigma < sampled[10, "dense", 8.0].sigma  # sampling amplifies
    args.baseline = False
    assert all(r.epsilon is not None for r in plan(args, [10]))


def test_results_of_several_seeds_merge_only_in_the_same_regime():
    settings = {"rounds": 2, "local_steps": 5, "cutoff": 64, "clip_norm": 1.0, "delta": 1e-5, "methods": ["flora"]}
    run = {"clients": 100, "per_round": 10, "method": "flora", "release": "dense", "epsilon": 8.0, "sigma": 4.0, "downlink_values": 9}
    first = {"settings": settings, "runs": [{**run, "seed": 0, "validation_loss": 2.0}]}
    second = {"settings": settings, "runs": [{**run, "seed": 1, "validation_loss": 3.0}]}
    (row,) = grid_rows([first, second])
    assert row["loss after 2"] == "2.500" and row["per seed"] == "0: 2.000, 1: 3.000" and row["noise std"] == "4.00e-01"
    with pytest.raises(SystemExit, match="local_steps"):
        check_regime([first, {**second, "settings": {**settings, "local_steps": 10}}])


def test_module_sets_name_the_model_a_scale_shape_or_one_module():
    assert module_set("model", {"q": (64, 64), "k": (64, 64), "v": (32, 64)}) == {(64, 64): 2, (32, 64): 1}
    assert module_set("1b", {}) == {(2048, 2048): 16, (512, 2048): 16}
    assert module_set("96x64", {}) == {(96, 64): 1}
    with pytest.raises(ValueError, match="--downlink-sets"):
        module_set("big", {})
