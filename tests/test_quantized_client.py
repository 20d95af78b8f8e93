"""A client with a 4-bit or 8-bit base: the cumulative global update held beside it, never merged.

Its model must be dequantize(quantize(base)) + the exact cumulative update, its held update the
server's after any number of rounds (and after a restart, with nothing downloaded again), and its
uploads ordinary LoRA factors the server's checks accept. bitsandbytes runs 4-bit on CPU, so a
tiny model exercises all of it here.
"""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fake_coordinator import FakeCoordinator, global_update_payload, random_adapter, serving, tiny_spec  # noqa: E402
from flora.client.config import ClientSettings  # noqa: E402
from flora.client.connection import Connection  # noqa: E402
from flora.client.local import ConfigError, check_extras, load_local_model  # noqa: E402
from flora.client.local_weights import HeldUpdate, folded, local_weights  # noqa: E402
from flora.client.progress import Progress  # noqa: E402
from flora.client.round_start import train_round  # noqa: E402
from flora.client.state import StateDir  # noqa: E402
from flora.client.sync import UPDATE, Synchroniser, expected_shapes, restore  # noqa: E402
from flora.client.trainer import TrainConfig  # noqa: E402
from flora.common.basemodel import BUILTIN_MODEL, load_model  # noqa: E402
from flora.common.data import Example, tokenize_examples  # noqa: E402
from flora.common.lora import LoraPair  # noqa: E402
from flora.common.methods import get_method  # noqa: E402
from flora.common.payload import PayloadMeta, read_adapter, write_adapter  # noqa: E402
from flora.common.quantize import dequantized_weight, is_quantized  # noqa: E402
from flora.common.update import module_delta  # noqa: E402
from flora.v1 import run_pb2  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def spec():
    return tiny_spec()


def quantized(spec, quantization="nf4"):
    """The built-in model quantized as a client with ``--quantize`` holds it, and its float original."""
    model = load_model(BUILTIN_MODEL)
    original = copy.deepcopy(model)
    return local_weights(model, expected_shapes(spec), quantization, torch.float32, CPU), original


def reference(local: HeldUpdate, original: torch.nn.Module, extra: dict | None = None) -> torch.nn.Module:
    """A plain float model whose linear weights are the quantized ones dequantized, plus the held update."""
    ref = copy.deepcopy(original)
    modules = dict(local.model.named_modules())
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name in modules and is_quantized(modules[name]):
                weight = dequantized_weight(modules[name])
                for part in ([local.held[name]] if name in local.held else []) + (extra or {}).get(name, []):
                    weight = weight + module_delta(part)
                module.weight.copy_(weight)
    return ref


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_forward_is_the_dequantized_base_plus_the_held_update(spec, quantization):
    local, original = quantized(spec, quantization)
    first, second = random_adapter(spec, 3, 1.0, seed=1), random_adapter(spec, 5, 1.0, seed=2)
    dense_name = spec.target_modules[0].name
    update = dict(first.pairs)
    update[dense_name] = module_delta(update[dense_name])  # one module sent dense, as the downlink may
    local.apply([update, second.pairs])
    tokens = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    want = logits(reference(local, original), tokens)
    got = logits(local.model, tokens)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # The update matters: the quantized base alone differs from it by far more than round-off.
    local.held.clear()
    assert (logits(local.model, tokens) - want).abs().max() > 100 * 1e-4  # 100x the tolerance above


def test_the_held_update_is_the_exact_sum_in_factors_or_dense_when_smaller():
    gen = torch.Generator().manual_seed(3)
    parts = [LoraPair(torch.randn(r, 40, generator=gen), torch.randn(30, r, generator=gen)) for r in (2, 3)]
    total = folded(folded(None, parts[0], torch.float32), parts[1], torch.float32)
    want = module_delta(parts[0]) + module_delta(parts[1])
    assert isinstance(total, LoraPair) and total.a.shape[0] == 5
    assert torch.allclose(module_delta(total), want, atol=1e-4)
    big = LoraPair(torch.randn(20, 40, generator=gen), torch.randn(30, 20, generator=gen))  # 25 x 70 > 30 x 40
    dense = folded(total, big, torch.float32)
    assert not isinstance(dense, LoraPair) and dense.shape == (30, 40)
    assert torch.allclose(dense, want + module_delta(big), atol=1e-3)
    sent_dense = folded(total, module_delta(big), torch.bfloat16)  # a dense part: the sum goes dense, in bf16
    assert sent_dense.dtype == torch.bfloat16
    assert torch.allclose(sent_dense.float(), want + module_delta(big), rtol=2**-7, atol=1e-2)


@pytest.fixture()
def synced(tmp_path, spec):
    """A fake server with two global updates, and a Synchroniser on a fresh state directory."""
    adapters = {1: random_adapter(spec, 6, 1.0, seed=1), 2: random_adapter(spec, 3, 1.0, seed=2)}
    fake = FakeCoordinator(spec, artifacts={(UPDATE, v): global_update_payload(a, v) for v, a in adapters.items()})
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    with serving(fake) as address:
        settings = ClientSettings(name="a", data=[data], server=address, backoff_initial=0.01, rpc_timeout=5)
        conn = Connection(settings, threading.Event())
        conn.token = "client-token-1"
        state = StateDir(tmp_path / "state")
        try:
            yield Synchroniser(conn, state, spec, Progress("off")), state, fake, adapters
        finally:
            state.close()
            conn.close()


def test_after_two_rounds_the_held_update_is_the_servers_and_survives_a_restart(synced, spec):
    sync, state, fake, adapters = synced
    local, _ = quantized(spec)
    base = {n: dequantized_weight(local.model.get_submodule(n)) for n in local.names}
    assert sync.catch_up(local, 0, 1) == 1 and sync.catch_up(local, 1, 2) == 2
    want = {n: sum(module_delta(LoraPair(a.pairs[n].a * a.scaling, a.pairs[n].b)) for a in adapters.values())
            for n in local.names}
    assert all(torch.allclose(module_delta(local.held[n]), want[n], atol=1e-6) for n in want)
    assert all(torch.equal(dequantized_weight(local.model.get_submodule(n)), base[n]) for n in base)  # never merged
    assert not any(r.allow_merged for r in fake.requests["FetchGlobal"])  # replays, never merged modules
    requests = len(fake.requests["FetchGlobal"])
    # A restart on the same state directory: the held update comes back from disk, nothing is fetched.
    fresh, _ = quantized(spec)
    assert restore(fresh, state, spec) == 2
    assert all(torch.equal(module_delta(fresh.held[n]), module_delta(local.held[n])) for n in want)
    assert len(fake.requests["FetchGlobal"]) == requests
    # A full-precision client cannot use the held form: it starts from the base instead.
    assert restore(load_model(BUILTIN_MODEL), state, spec) == 0


def tiny_data(tiny_tokenizer, count=8):
    return tokenize_examples([Example(f"Say {i}: ", f"{i} " * 5) for i in range(count)], tiny_tokenizer, cutoff=64)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_warm_started_round_leaves_the_model_as_it_was_and_uploads_what_the_server_accepts(
    spec, tiny_tokenizer, tmp_path, quantization
):
    local, _ = quantized(spec, quantization)
    local.apply([random_adapter(spec, 4, 1.0, seed=5).pairs])
    method = get_method("flora-warm")
    kept = method.merge(None, [random_adapter(spec, 4, 2.0, seed=6)], [1.0]).kept
    config = TrainConfig(rank=4, target_modules=tuple(local.names), max_steps=2, batch_size=4, device="cpu")
    start = method.start(kept, config.rank, config.scaling)
    tokens = torch.randint(4, 200, (1, 16), generator=torch.Generator().manual_seed(1))
    before = logits(local.model, tokens)
    with local.temporarily(start.removed):  # the warm start is removed beside the held update
        removed = logits(local.model, tokens)
    assert (removed - before).abs().max() > 1e-4
    result = train_round(local, tiny_data(tiny_tokenizer), config, start)
    assert torch.equal(logits(local.model, tokens), before)  # held update, extras and layers as before
    assert torch.isfinite(torch.tensor(result.train_loss))
    path = tmp_path / "upload.safetensors"
    write_adapter(path, result.adapter, PayloadMeta("client_update", rank=4, alpha=8.0, scaling_rule="standard", round=1))
    adapter, meta = read_adapter(path, expected_shapes(spec), rank=4)
    assert meta.rank == 4 and set(adapter.pairs) == set(local.names)
    assert any(float(p.b.abs().max()) > 0 for p in adapter.pairs.values())  # B trained from its start


def test_a_missing_bitsandbytes_is_a_config_error_naming_the_install(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'flora-fl\[qlora\]'"):
        check_extras(ClientSettings(name="a", data=[data], quantize="nf4"))
    check_extras(ClientSettings(name="a", data=[data]))  # no quantization: bitsandbytes not needed


def test_the_fingerprint_is_of_the_unquantized_base_and_still_refuses_another(tmp_path, spec):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    settings = ClientSettings(name="a", data=[data], quantize="nf4", device="cpu")
    loaded = load_local_model(settings, spec, ([Example("", "x")], []))
    assert loaded.digest == spec.base_model_hash and isinstance(loaded.weights, HeldUpdate)
    assert all(is_quantized(loaded.model.get_submodule(n)) for n in loaded.weights.names)
    other = run_pb2.RunSpec()
    other.CopyFrom(spec)
    other.base_model_hash = "0" * 64
    with pytest.raises(ConfigError, match="differs from the server's"):
        load_local_model(settings, other, ([Example("", "x")], []))


def test_a_model_without_linear_layers_to_quantize_is_refused_not_run_at_full_precision():
    """GPT-2's blocks are Conv1D layers: none would be quantized, and the client must say so."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from flora.common.quantize import quantize_model

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match=r"quantize: GPT2LMHeadModel has no nn.Linear layer .*--quantize none"):
        quantize_model(model, "nf4", torch.float32, torch.device("cpu"))
