"""flora-sim's compressed downlink: the server's own planning, merged by the model, remainder carried."""

from __future__ import annotations

import json

import pytest
import torch

from flora.client.trainer import TrainConfig
from flora.common.aggregation import flora_stack
from flora.common.basemodel import BUILTIN_MODEL, load_model, target_module_shapes
from flora.common.downlink import DownlinkPolicy, plan_downlink
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.merge import merge_into_model, module_weights
from flora.common.update import module_delta
from flora.sim.cli import main
from flora.sim.downlink import DownlinkChannel, parse_policy, policy_label
from flora.sim.engine import SimConfig, run_method
from flora.sim.federation import DataOptions, load_federation, sample_files

TARGETS = ("q_proj", "v_proj")


def random_round(shapes: dict[str, tuple[int, int]], seed: int) -> LoraAdapter:
    """A round's stacked delta of three clients (ranks 4, 2, 1), as flora merges it."""
    gen = torch.Generator().manual_seed(seed)
    clients = [
        LoraAdapter({n: LoraPair(torch.randn(r, i, generator=gen), torch.randn(o, r, generator=gen) * 0.1)
                     for n, (o, i) in shapes.items()}, 2.0)
        for r in (4, 2, 1)
    ]
    return flora_stack(clients, [0.5, 0.3, 0.2])


def weights_of(model) -> dict[str, torch.Tensor]:
    return {n: w.detach().double().clone() for n, w in module_weights(model, sorted(SHAPES)).items()}


SHAPES = target_module_shapes(load_model(BUILTIN_MODEL), TARGETS)


@pytest.mark.parametrize("text, label", [("exact", "exact"), ("e0.95", "e0.95"), ("r3+bfloat16", "r3+bfloat16"),
                                         ("e0.9+r2+float16", "e0.9+r2+float16")])
def test_policy_labels_round_trip(text, label):
    assert policy_label(parse_policy(text)) == label
    assert parse_policy(label) == parse_policy(text)


@pytest.mark.parametrize("text, message", [("q0.9", "'q0.9' is not exact"), ("e1.5", "energy 1.5 must be in"), ("r0", "max_rank 0")])
def test_bad_policies_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(text)


def test_the_exact_channel_merges_the_delta_unchanged():
    model, oracle = load_model(BUILTIN_MODEL), load_model(BUILTIN_MODEL)
    delta = random_round(SHAPES, seed=1)
    assert DownlinkChannel().merge(model, delta) is None
    merge_into_model(oracle, delta)
    for name in SHAPES:
        assert torch.equal(model.get_submodule(name).weight, oracle.get_submodule(name).weight)


def test_a_lossy_channel_merges_what_the_server_sends_and_carries_the_rest():
    policy = DownlinkPolicy(energy=0.8, max_rank=3, dtype=torch.bfloat16)
    model, channel = load_model(BUILTIN_MODEL), DownlinkChannel(policy)
    base = weights_of(model)
    exact = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    remainder = {}
    for number in (1, 2, 3):
        delta = random_round(SHAPES, seed=number)
        before = weights_of(model)
        # The server's planning of the same round, from the same carried remainder.
        stack = {n: LoraPair(p.a * delta.scaling, p.b) for n, p in delta.pairs.items()}
        served = plan_downlink(stack, remainder, policy)
        remainder = served.remainder
        figures = channel.merge(model, delta)
        after = weights_of(model)
        for name in SHAPES:
            exact[name] += delta.delta(name, torch.float64)
            torch.testing.assert_close(after[name] - before[name], module_delta(served.update[name], torch.float64),
                                       rtol=0, atol=1e-6)
        assert figures["rank_max"] <= 3 and 0.0 < figures["retained_energy"] < 1.0 and figures["remainder_norm"] > 0
        assert figures["values"] < figures["dense_values"]
    for name in SHAPES:  # nothing lost: what was merged plus the final remainder is the exact total
        merged = after[name] - base[name]
        carried = module_delta(channel.remainder[name], torch.float64)
        error = torch.linalg.matrix_norm(merged + carried - exact[name]) / torch.linalg.matrix_norm(exact[name])
        assert error < 1e-5


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_tokenizer):
    files = sample_files(tmp_path_factory.mktemp("sample"), clients=2, per_client=12, seed=0)
    return load_federation(files, tiny_tokenizer, DataOptions(template="plain", cutoff=32, validation_fraction=0.25))


def test_a_simulated_run_records_its_compressed_downlink(federation):
    local = TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2, device="cpu")
    config = SimConfig("flora", (4, 2), 1, local, downlink=DownlinkPolicy(max_rank=1))
    records = [o.record for o in run_method(load_model(BUILTIN_MODEL), federation.clients, federation.validation, config)]
    assert records[0].downlink is None
    assert records[1].downlink["rank_max"] == 1 and records[1].downlink["retained_energy"] < 1.0


def test_cli_takes_the_servers_downlink_options_and_refuses_bad_ones(tmp_path, capsys):
    tiny = ["--rounds", "1", "--local-steps", "1", "--examples-per-client", "8", "--cutoff", "32", "--template", "plain",
            "--ranks", "2,1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main([*tiny, "--downlink-energy", "0"])
    assert exc.value.code == 2 and "downlink energy 0.0 must be in (0, 1]" in capsys.readouterr().err
    main([*tiny, "--downlink-max-rank", "1", "--downlink-dtype", "bfloat16"])
    last = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])
    assert last["downlink"]["rank_max"] == 1
    assert "downlink energy" in capsys.readouterr().out
