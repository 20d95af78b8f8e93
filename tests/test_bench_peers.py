"""bench/peers.py's and bench/peers_finetune.py's tables from recorded results, and bench/scale.py's parameter count.

Neither needs Flower, the network or a server: the Flower run itself is the benchmark's job (it
installs Flower into its own environment), these check the arithmetic its table is made of.
"""

from __future__ import annotations

import json
import tomllib

import pytest

from bench import peers_finetune
from bench.peers import APP, combine, flora_rows, flower_rows
from bench.scale import SHAPES, Shape

MiB = 1 << 20


def _flower_sample(size: int, up_s: float, down_s: float, peak: int, warmup: bool = False) -> dict:
    memory = {"peak": peak, "tree_peak": peak + 100, "growth": peak // 2}
    return {"bytes": size, "up_s": up_s, "down_s": down_s, "warmup": warmup, "up_memory": memory, "down_memory": memory}


def test_flower_rows_take_medians_and_subtract_the_fixed_cost() -> None:
    result = {
        "samples": [_flower_sample(16 * MiB, 100.0, 100.0, 10, warmup=True)]
        + [_flower_sample(16 * MiB, s, 2 * s, 1000 + i) for i, s in enumerate([2.0, 3.0, 4.0])],
        "empty": [_flower_sample(4, s, 1.0, 5) for s in (0.9, 1.0, 1.1)],
    }
    (row,) = flower_rows(result)
    assert row["size_MiB"] == 16
    assert row["upload_MBps"] == pytest.approx(16 * MiB / 3.0 / 1e6)  # the warm-up's 100 s is left out
    assert row["upload_net_MBps"] == pytest.approx(16 * MiB / 2.0 / 1e6)  # median 3 s minus 1 s fixed
    assert row["download_net_MBps"] == pytest.approx(16 * MiB / 5.0 / 1e6)
    assert row["server_rss_MB"] == pytest.approx(1002 / 1e6)


def test_no_net_rate_where_the_transfer_is_not_slower_than_an_empty_message() -> None:
    result = {"samples": [_flower_sample(MiB, 0.5, 0.5, 1)], "empty": [_flower_sample(4, 1.0, 1.0, 1)]}
    assert flower_rows(result)[0]["upload_net_MBps"] is None


def test_combined_rows_pair_each_size_and_give_the_upload_ratio() -> None:
    transport = [
        {"size_MiB": 1.0, "direction": d, "payload_bytes": MiB, "grpc_MBps": v, "rss_peak_MB": 400.0,
         "rss_growth_MB": 2.0, "raw_MBps": 900.0} for d, v in (("upload", 30.0), ("download", 60.0))
    ]
    flower = flower_rows({"samples": [_flower_sample(MiB, MiB / 10e6, 1.0, 1)], "empty": [_flower_sample(4, 0.0, 0.0, 1)]})
    rows = combine(flora_rows(transport), flower)
    assert [r["system"] for r in rows] == ["flora", flower[0]["system"]]
    assert rows[0]["upload_MBps"] == 30.0 and rows[0]["download_MBps"] == 60.0
    assert rows[0]["flora_over_flower_up"] == pytest.approx(3.0)


@pytest.mark.parametrize("app", [APP, peers_finetune.APP], ids=["floraprobe", "floraft"])
def test_the_flower_app_names_components_that_exist(app) -> None:
    config = tomllib.loads((app / "pyproject.toml").read_text())
    for ref in config["tool"]["flwr"]["app"]["components"].values():
        module, _, attribute = ref.partition(":")
        source = (app / (module.replace(".", "/") + ".py")).read_text()
        assert f"{attribute} = " in source, ref


def test_the_finetune_run_config_sets_every_key_the_app_declares() -> None:
    declared = tomllib.loads((peers_finetune.APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    given = tomllib.loads(peers_finetune.run_config(2, 3, peers_finetune.APP / "out.json").replace(" ", "\n"))
    assert set(given) == set(declared)
    assert (given["seed"], given["rounds"], given["rank"], given["local-steps"]) == (2, 3, 4, 10)


def _flower_run(seed: int, losses: list[float]) -> dict:
    history = [{"round": 0, "validation_loss": losses[0], "train_loss": None}]
    history += [{"round": r, "validation_loss": loss, "up_bytes": 300_000, "down_bytes": 200_000, "messages_up": 10}
                for r, loss in enumerate(losses[1:], start=1)]
    return {"seed": seed, "history": history}


def test_finetune_rows_pair_flower_with_fedit_by_seed_and_give_bytes_per_client() -> None:
    flower = [_flower_run(0, [4.0, 3.0, 2.0]), _flower_run(1, [4.0, 3.2, 2.2])]
    recorded = {"fedit": {0: [4.0, 2.9, 1.9], 1: [4.0, 3.1, 2.1], 2: [4.0, 9.0, 9.0]},
                "fedex": {0: [4.0, 2.8, 1.7], 1: [4.0, 3.0, 1.9]}}
    sent = {"fedit": [{"round": r, "up_bytes": 200_000, "down_bytes": 500_000, "clients": 10} for r in (1, 2)]}
    rows = peers_finetune.table_rows(flower, recorded, sent, rounds=2)
    assert [(r["round"], r["system"]) for r in rows] == [
        (n, s) for n in (0, 1, 2) for s in (peers_finetune.FLOWER, "flora fedit", "flora fedex")]
    flower_2, fedit_2, fedex_2 = rows[6:9]
    assert flower_2["minus_fedit"] == pytest.approx(0.1)  # seed 2 of fedit has no Flower twin: left out
    assert flower_2["validation_loss"] == f"{2.1:.4f} ± {0.1414:.4f}"
    assert flower_2["up_per_client_KB"] == pytest.approx(30.0) and flower_2["down_MB"] == pytest.approx(0.2)
    assert fedit_2["minus_fedit"] is None and fedit_2["seeds"] == 3 and fedit_2["down_per_client_KB"] == pytest.approx(50.0)
    assert fedex_2["minus_fedit"] == pytest.approx(-0.2) and "up_MB" not in fedex_2  # no bytes measured for it
    assert "up_MB" not in rows[0]  # round 0: the starting model, no traffic


def test_recorded_losses_keep_equal_rank_exact_runs_with_enough_rounds() -> None:
    def line(label: str, seed: int, rounds: int) -> str:
        return json.dumps({"label": label, "history": [{"round": r, "seed": seed, "validation_loss": 4.0 - r}
                                                       for r in range(rounds + 1)]})
    lines = [line("fedit-equal", 0, 10), line("fedit-equal", 1, 2), line("fedex-mixed", 0, 3),
             line("flora@e0.95-equal", 0, 3), line("flora-equal", 1, 3)]
    losses = peers_finetune.recorded_losses(lines, ["fedit", "flora", "fedex"], rounds=3)
    assert losses == {"fedit": {0: [4.0, 3.0, 2.0, 1.0]}, "flora": {1: [4.0, 3.0, 2.0, 1.0]}, "fedex": {}}


def test_recorded_runs_of_another_setting_are_refused() -> None:
    quality = {"settings": {**peers_finetune.SETTING}, "base_model": str(peers_finetune.BASE_MODEL),
               "data": str(peers_finetune.DATA)}
    peers_finetune.check_setting(quality)
    with pytest.raises(SystemExit, match="local_steps"):
        peers_finetune.check_setting({**quality, "settings": {**peers_finetune.SETTING, "local_steps": 20}})


@pytest.mark.parametrize("shape", [SHAPES["tiny"], Shape(64, 160, 2, 4, 2, 300, True)], ids=["untied", "tied"])
def test_scale_parameter_count_matches_the_built_model(shape: Shape) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied)
    model = LlamaForCausalLM(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
