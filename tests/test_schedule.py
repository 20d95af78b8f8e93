"""Learning-rate schedules: per round (cosine, constant) and one over the whole run (``run``)."""

from __future__ import annotations

import math

import pytest

from flora.client.config import ClientSettings
from flora.client.trainer import TrainConfig, lr_at
from flora.v1 import run_pb2


def rates(config: TrainConfig, steps: int) -> list[float]:
    return [lr_at(step, steps, config) for step in range(steps)]


@pytest.mark.parametrize("warmup", [0, 2, 7])
def test_run_schedule_is_one_cosine_over_all_rounds(warmup):
    rounds, steps = 3, 5
    run = [lr for r in range(1, rounds + 1)
           for lr in rates(TrainConfig(schedule="run", round=r, rounds=rounds, warmup_steps=warmup), steps)]
    assert run == rates(TrainConfig(schedule="cosine", warmup_steps=warmup), rounds * steps)
    assert all(a >= b for a, b in zip(run[warmup:], run[warmup + 1:])), "decays monotonically after warmup"


def test_per_round_cosine_restarts_each_round_and_run_does_not():
    cosine = TrainConfig(schedule="cosine", learning_rate=0.1, round=3, rounds=3)
    assert lr_at(0, 10, cosine) == 0.1
    last = TrainConfig(schedule="run", learning_rate=0.1, round=3, rounds=3)
    assert lr_at(0, 10, last) == pytest.approx(0.1 * 0.5 * (1 + math.cos(2 * math.pi / 3)))  # two thirds through the run
    assert lr_at(0, 10, TrainConfig(schedule="run", learning_rate=0.1, round=1, rounds=3)) == 0.1


def test_rounds_beyond_the_planned_count_keep_the_final_rate():
    extended = TrainConfig(schedule="run", learning_rate=0.1, round=5, rounds=3)
    assert rates(extended, 4) == [0.0] * 4


def test_schedule_run_with_one_round_is_the_per_round_cosine():
    assert rates(TrainConfig(schedule="run"), 6) == rates(TrainConfig(schedule="cosine"), 6)


def test_the_daemons_round_config_carries_the_task_round_and_the_run_rounds(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    settings = ClientSettings(name="a", data=[data], schedule="run")
    config = settings.train_config(["m"], run_pb2.TrainingHints(), 1, seed=0, round_number=4, rounds=10)
    assert (config.schedule, config.round, config.rounds) == ("run", 4, 10)
    assert "round" not in ClientSettings.model_fields and "rounds" not in ClientSettings.model_fields
    with pytest.raises(ValueError, match="schedule"):
        ClientSettings(name="a", data=[data], schedule="linear")
