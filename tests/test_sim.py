"""flora-sim: its rounds are the real system's maths, it learns, and its CLI reports and refuses clearly."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from flora.client.trainer import TrainConfig, total_steps
from flora.common.aggregation import flora_stack
from flora.common.basemodel import BUILTIN_MODEL, load_model
from flora.common.merge import merged_weights, module_weights
from flora.common.weights import client_weights
from flora.client import round_start
from flora.sim.cli import main
from flora.sim.engine import CENTRALIZED, SimConfig, run_method, select_clients
from flora.sim.federation import DataOptions, load_federation, sample_files

MIXED = (4, 2, 1)
LOCAL = TrainConfig(max_steps=3, batch_size=4, learning_rate=1e-2, device="cpu")


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_tokenizer):
    """Three non-IID clients of the built-in sample data, short sequences."""
    files = sample_files(tmp_path_factory.mktemp("sample"), clients=3, per_client=24, seed=0)
    return load_federation(files, tiny_tokenizer, DataOptions(template="plain", cutoff=48, validation_fraction=0.25))


def run(federation, method: str, ranks=MIXED, rounds: int = 1, local: TrainConfig = LOCAL, model=None, **kwargs):
    """All outcomes of one simulated run (round 0 first) on ``model`` or a fresh built-in model."""
    config = SimConfig(method, tuple(ranks), rounds, local, **kwargs)
    model = model if model is not None else load_model(BUILTIN_MODEL)
    return list(run_method(model, federation.clients, federation.validation, config))


def test_flora_round_merges_exactly_the_stack_of_the_clients_adapters(federation) -> None:
    base, model = load_model(BUILTIN_MODEL), load_model(BUILTIN_MODEL)
    outcome = run(federation, "flora", model=model)[1]
    assert [u.rank for u in outcome.updates] == list(MIXED) and outcome.delta.rank == sum(MIXED) and outcome.kept is None
    assert outcome.weights == client_weights([len(c.train) for c in federation.clients])
    stacked = flora_stack(outcome.updates, outcome.weights)
    expected = merged_weights(module_weights(base, stacked.module_names), stacked)
    merged = dict(model.named_parameters())
    for name, param in base.named_parameters():
        module = name.removesuffix(".weight")
        target = expected[module] if module in expected else param
        assert torch.equal(merged[name], target), name


def test_flora_error_is_round_off_and_fedit_has_cross_terms(federation) -> None:
    flora = run(federation, "flora", ranks=(2, 2, 2))[1].record.aggregation_error
    fedit = run(federation, "fedit", ranks=(2, 2, 2))[1].record.aggregation_error
    assert flora < 1e-6
    assert fedit > 1e-4


def test_zeropad_clients_start_from_the_leading_rows_of_the_global_lora(federation) -> None:
    # A learning rate this small leaves each client's factors within 1e-5 of where it started.
    still = LOCAL.model_copy(update={"learning_rate": 1e-6, "max_steps": 2})
    outcomes = run(federation, "zeropad", rounds=2, local=still)
    assert all(o.kept.rank == max(MIXED) for o in outcomes)
    for previous, current in zip(outcomes, outcomes[1:]):
        for update in current.updates:
            for name, (a, b) in update.pairs.items():
                start = previous.kept.pairs[name]
                assert torch.allclose(a, start.a[: update.rank], atol=1e-5)
                assert torch.allclose(b, start.b[:, : update.rank], atol=1e-5)
    # Round 2 started from the padded average, not from each client's own round-1 factors.
    first, second = outcomes[1].updates[0], outcomes[2].updates[0]
    name = first.module_names[0]
    assert not torch.allclose(first.pairs[name].a, second.pairs[name].a, atol=1e-3)


def test_validation_loss_decreases_over_rounds(federation) -> None:
    losses = [o.record.validation_loss for o in run(federation, "flora", rounds=3)]
    assert losses[1] < losses[0] and losses[2] < losses[1] and losses[3] < losses[2]


def test_centralized_trains_one_lora_on_the_union_for_the_clients_steps(federation, monkeypatch) -> None:
    calls = []
    real = round_start.train_lora

    def spy(model, data, config, **kwargs):
        calls.append((len(data), config))
        return real(model, data, config, **kwargs)

    monkeypatch.setattr(round_start, "train_lora", spy)
    epochs = LOCAL.model_copy(update={"max_steps": 0, "epochs": 1})
    outcome = run(federation, CENTRALIZED, local=epochs)[1]
    ((examples, config),) = calls
    assert examples == sum(len(c.train) for c in federation.clients)
    assert config.rank == max(MIXED) and outcome.updates[0].rank == max(MIXED)
    assert config.max_steps == sum(total_steps(len(c.train), epochs) for c in federation.clients)
    assert outcome.record.aggregation_error < 1e-6


def test_same_seed_same_history(federation) -> None:
    def history(seed: int) -> list[tuple]:
        return [(o.record.validation_loss, o.record.train_loss) for o in run(federation, "fedit", ranks=(2, 2, 2), seed=seed)]

    assert history(3) == history(3)
    assert history(3) != history(4)


def test_partial_participation_is_seeded_and_shared_by_methods(federation) -> None:
    assert select_clients(10, 4, 7, 2) == select_clients(10, 4, 7, 2)
    assert len(set(select_clients(10, 4, 7, 2))) == 4
    assert select_clients(10, None, 7, 2) == list(range(10))
    clients = [o.record.clients for o in run(federation, "flora", rounds=2, clients_per_round=2)]
    assert clients[0] == [] and all(len(c) == 2 for c in clients[1:])
    assert clients == [o.record.clients for o in run(federation, "zeropad", rounds=2, clients_per_round=2)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "fedit", "ranks": (4, 2)}, "same rank"),
        ({"method": "flora", "ranks": (4, 0)}, "ranks"),
        ({"method": "flora", "ranks": (4, 2), "clients_per_round": 3}, "clients_per_round"),
        ({"method": "fedavg", "ranks": (4,)}, "not one of"),
        ({"method": "ffa", "ranks": (4, 2), "local": TrainConfig(alpha=1.0, device="cpu")}, "one LoRA scaling"),
    ],
)
def test_sim_config_rejects_impossible_runs(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig(rounds=1, **kwargs)


# --- the CLI ----------------------------------------------------------------------------------

TINY = ["--rounds", "1", "--local-steps", "1", "--examples-per-client", "8", "--cutoff", "48", "--template", "plain"]


def test_cli_writes_history_and_plot(tmp_path, capsys) -> None:
    main([*TINY, "--ranks", "2,1", "--method", "flora,zeropad,centralized", "--out", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in lines] == [(m, t) for m in ("flora", "zeropad", CENTRALIZED) for t in (0, 1)]
    assert {"clients", "validation_loss", "train_loss", "aggregation_error", "seconds"} <= set(lines[1])
    assert (tmp_path / "validation_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| round | flora" in capsys.readouterr().out


@pytest.mark.parametrize("ranks", ["0", "a,b", "4,-1", "", "4,,2"])
def test_cli_rejects_bad_ranks_with_exit_code_2(ranks, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--ranks", ranks, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--ranks" in capsys.readouterr().err


def test_cli_rejects_a_rank_count_that_does_not_match_the_data_files(tmp_path, capsys) -> None:
    sample_files(tmp_path / "data", clients=2, per_client=8, seed=0)
    (tmp_path / "data" / "validation.json").unlink()
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--ranks", "4,2,1", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "3 ranks but --data-dir has 2 client files" in capsys.readouterr().err


def test_cli_rejects_fedit_with_mixed_ranks(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--ranks", "4,2", "--method", "flora,fedit", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "same rank" in capsys.readouterr().err
    assert not (tmp_path / "history.jsonl").exists()  # refused before any work


def test_installed_console_script_exits_2_on_bad_ranks(tmp_path) -> None:
    script = shutil.which("flora-sim")
    assert script, "flora-sim is not installed on PATH"
    result = subprocess.run([script, "--ranks", "a,b", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "'a' is not a whole number >= 1" in result.stderr


# --- the methods of flora.common.methods, as flora-sim runs them ------------------------------

NEW_METHODS = ["flora-warm", "fedex", "ffa", "flexlora"]


@pytest.mark.parametrize("method", NEW_METHODS)
def test_every_method_runs_mixed_ranks_and_exact_ones_stay_exact(federation, method) -> None:
    outcomes = run(federation, method, rounds=2)
    assert [u.rank for u in outcomes[2].updates] == list(MIXED)
    assert outcomes[2].record.validation_loss < outcomes[0].record.validation_loss
    if engine_method(method).exact:
        assert all(o.record.aggregation_error < 1e-6 for o in outcomes[1:])


def engine_method(name: str):
    from flora.common.methods import get_method

    return get_method(name)


@pytest.mark.parametrize("method", ["flora-warm", "fedex", "ffa"])
def test_warm_started_clients_start_round_two_on_the_global_model(federation, method, tiny_model) -> None:
    """With a learning rate of ~0 a client's validation loss after training is the global model's."""
    from flora.client.round_start import train_round

    outcomes = run(federation, method, rounds=1, model=tiny_model)
    global_loss = outcomes[1].record.validation_loss
    start = engine_method(method).start(outcomes[1].kept, 4, 2.0)  # alpha = 2 * rank: scaling 2
    still = LOCAL.model_copy(update={"learning_rate": 1e-12, "max_steps": 1, "rank": 4})
    result = train_round(tiny_model, federation.clients[0].train, still, start, val_data=federation.validation)
    assert start.init is not None and abs(result.validation_loss - global_loss) < 1e-5


def test_ffa_clients_never_change_the_shared_a(federation) -> None:
    outcomes = run(federation, "ffa", rounds=2)
    for previous, current in zip(outcomes, outcomes[1:]):
        for update in current.updates:
            for name, pair in update.pairs.items():
                assert torch.equal(pair.a, previous.kept.pairs[name].a[: update.rank])


def test_cli_seeds_report_mean_and_spread(tmp_path, capsys) -> None:
    main([*TINY, "--ranks", "2,1", "--method", "flora-warm", "--seeds", "2", "--out", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["round"]) for r in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert lines[1]["validation_loss"] != lines[3]["validation_loss"]
    out = capsys.readouterr().out
    assert "mean ± std over 2 seeds" in out and " ± " in out.split("mean ± std")[1]


def test_cli_rejects_a_seed_count_out_of_range(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--seeds", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--seeds must be between 1 and 100" in capsys.readouterr().err
