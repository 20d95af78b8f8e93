"""The one thread rule: --threads when given, else the usable cores shared by flora's training processes."""

from __future__ import annotations

import os

import pytest
import torch

from flora.client import cli
from flora.common.threads import set_threads, threads_per_process, usable_cores
from flora.sim.cli import main as sim_main

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("cpu_max", "cores"), [("max 100000\n", AFFINITY), ("50000 100000\n", 1), ("garbage", AFFINITY)])
def test_usable_cores_is_the_affinity_capped_by_the_cgroup_quota(tmp_path, cpu_max, cores):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert usable_cores(tmp_path / "cpu.max") == cores
    assert usable_cores(tmp_path / "absent") == AFFINITY


def test_quota_above_one_core_rounds_up_and_never_exceeds_the_affinity(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000")
    assert usable_cores(tmp_path / "cpu.max") == min(AFFINITY, 2)


@pytest.mark.parametrize(("processes", "cores", "threads"), [(1, 8, 8), (3, 8, 2), (3, 2, 1), (4, 16, 4), (0, 2, 2)])
def test_cores_are_divided_among_the_processes(processes, cores, threads):
    assert threads_per_process(processes, cores=cores) == threads


def test_requested_threads_win_and_must_be_positive():
    assert threads_per_process(4, requested=3, cores=2) == 3
    with pytest.raises(ValueError, match="threads: 0 is not >= 1"):
        threads_per_process(1, requested=0)


def test_set_threads_sizes_torchs_pool():
    before = torch.get_num_threads()
    try:
        assert set_threads(requested=1) == 1 and torch.get_num_threads() == 1
        assert set_threads(processes=AFFINITY) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_client_threads_flag_is_validated(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    assert cli.main(["--print-config", "--name", "alice", "--data", str(data), "--threads", "3"]) == 0
    assert "threads = 3" in capsys.readouterr().out
    assert cli.main(["--name", "alice", "--data", str(data), "--threads", "0"]) == 2
    assert "threads" in capsys.readouterr().err


def test_sim_threads_flag_is_validated(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        sim_main(["--threads", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "threads: 0 is not >= 1" in capsys.readouterr().err
    assert not (tmp_path / "history.jsonl").exists()
