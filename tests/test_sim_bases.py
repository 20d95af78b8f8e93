"""flora-sim --quantize and --nproc: clients on 4-bit bases and data-parallel groups, as the daemon runs them.

A quantized client's model must stay quantize(base) + the global update of the same version,
whatever the downlink sends; a data-parallel group must give the single process's run to
round-off (and leave the shared global model untouched); bad combinations are refused with
exit status 2 before any work.
"""

from __future__ import annotations

import sys

import pytest
import torch

from flora.client.trainer import TrainConfig
from flora.common.basemodel import BUILTIN_MODEL, load_model
from flora.common.downlink import DownlinkPolicy
from flora.common.lora import LoraAdapter, LoraPair
from flora.common.merge import module_weights
from flora.common.update import module_delta
from flora.sim.backends import LocalBackend, make_backend
from flora.sim.bases import QuantizedBases, client_bases
from flora.sim.cli import main
from flora.sim.downlink import DownlinkChannel
from flora.sim.engine import SimConfig, run_method
from flora.sim.federation import DataOptions, load_federation, sample_files

TINY = ["--examples-per-client", "12", "--cutoff", "48", "--local-steps", "2", "--batch-size", "4", "--rounds", "1",
        "--template", "plain", "--threads", "1"]
LOCAL = TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2, device="cpu")


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_tokenizer):
    files = sample_files(tmp_path_factory.mktemp("sample"), clients=2, per_client=16, seed=0)
    return load_federation(files, tiny_tokenizer, DataOptions(template="plain", cutoff=48, validation_fraction=0.25))


def test_bases_are_cycled_over_the_clients_and_checked():
    assert client_bases(["none", "nf4"], 5) == ("none", "nf4", "none", "nf4", "none")
    with pytest.raises(ValueError, match="--quantize 'nf3'"):
        client_bases(["nf3"], 2)


def random_delta(model, rank: int, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = module_weights(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"])
    return LoraAdapter({name: LoraPair(torch.randn(rank, w.shape[1], generator=gen) * 0.05,
                                       torch.randn(w.shape[0], rank, generator=gen) * 0.05) for name, w in weights.items()}, 2.0)


@pytest.mark.parametrize("policy", [DownlinkPolicy(), DownlinkPolicy(energy=0.9)], ids=["exact", "energy-0.9"])
def test_a_quantized_base_holds_exactly_what_the_global_model_merged(policy):
    pytest.importorskip("bitsandbytes")
    model = load_model(BUILTIN_MODEL)
    base = {name: w.clone() for name, w in module_weights(model, _targets(model)).items()}
    bases = QuantizedBases(model, ("none", "nf4"), None, "none", torch.device("cpu"))
    channel = DownlinkChannel(policy)
    for seed in (1, 2):
        channel.merge(model, random_delta(model, 3, seed), bases)
    held = bases.models()["nf4"]
    for name, weight in module_weights(model, _targets(model)).items():
        moved = weight - base[name]
        got = module_delta(held.held[name]) if name in held.held else torch.zeros_like(moved)
        assert torch.allclose(got, moved, atol=1e-6), name  # float32 round-off of the merges


def _targets(model) -> list[str]:
    from flora.common.basemodel import target_module_shapes

    return sorted(target_module_shapes(model, None))


def test_half_the_clients_on_nf4_train_on_their_quantized_base(federation):
    pytest.importorskip("bitsandbytes")

    def train_losses(bases):
        config = SimConfig("flora-warm", (4, 4), 2, LOCAL, bases=bases)
        return [o.record.train_loss for o in run_method(load_model(BUILTIN_MODEL), federation.clients,
                                                        federation.validation, config)][1:]

    full, mixed = train_losses(("none", "none")), train_losses(("none", "nf4"))
    assert all(abs(f - m) > 1e-4 for f, m in zip(full, mixed))  # 4-bit rounding, far above float round-off
    assert all(torch.isfinite(torch.tensor(m)) for m in mixed)


def test_cli_runs_a_mixed_run_and_names_its_bases(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    main([*TINY, "--ranks", "2", "--clients", "2", "--quantize", "none,nf4", "--out", str(tmp_path)])
    assert "bases ['none', 'nf4']" in capsys.readouterr().out
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 2  # rounds 0 and 1


@pytest.mark.parametrize("args, message", [
    (["--quantize", "nf3"], "--quantize 'nf3'"),
    (["--quantize", "nf4", "--nproc", "2"], "--quantize works with --backend local and --nproc 1"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "2", "--backend", "ray"], "--nproc 2 works with --backend local"),
])
def test_cli_refuses_bad_quantize_and_nproc_with_exit_code_2(args, message, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(SystemExit) as exc:
        main([*TINY, *args, "--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_names_the_install_when_bitsandbytes_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--quantize", "nf4", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "pip install 'flora-fl[qlora]'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_per_client_give_the_single_process_run_and_leave_the_model_alone(federation):
    """flora-warm removes its start from the weights for the round: on shared memory, two ranks
    doing so at once would corrupt the global model (the group must train on copies)."""
    config = SimConfig("flora-warm", (4,), 2, LOCAL)
    clients = federation.clients[:1]

    def history(backend):
        model = load_model(BUILTIN_MODEL)
        return [(o.record.validation_loss, o.record.train_loss)
                for o in run_method(model, clients, federation.validation, config, backend)]

    single, group = history(LocalBackend()), history(make_backend("local", nproc=2, threads=1))
    for (v1, t1), (v2, t2) in zip(single[1:], group[1:]):
        assert abs(v1 - v2) < 1e-4 and abs(t1 - t2) < 1e-4
