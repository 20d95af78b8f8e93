"""bench/peers.py's table from recorded samples, and bench/scale.py's parameter count.

Neither needs Flower, the network or a server: the Flower run itself is the benchmark's job (it
installs Flower into its own environment), these check the arithmetic its table is made of.
"""

from __future__ import annotations

import tomllib

import pytest

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


def test_the_flower_app_names_components_that_exist() -> None:
    config = tomllib.loads((APP / "pyproject.toml").read_text())
    for ref in config["tool"]["flwr"]["app"]["components"].values():
        module, _, attribute = ref.partition(":")
        source = (APP / (module.replace(".", "/") + ".py")).read_text()
        assert f"{attribute} = " in source, ref


@pytest.mark.parametrize("shape", [SHAPES["tiny"], Shape(64, 160, 2, 4, 2, 300, True)], ids=["untied", "tied"])
def test_scale_parameter_count_matches_the_built_model(shape: Shape) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied)
    model = LlamaForCausalLM(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
