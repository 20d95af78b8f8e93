"""A quantized client's dtypes: the base read in the checkpoint's own, the held sums in the compute dtype.

A bf16 checkpoint read into float32 before quantizing would double the very memory a 4-bit base
is chosen to save; a dense held sum kept in float32 beside a bf16 forward would be twice the size
the issue allows. Neither may cost exactness: the fingerprint is still that of the float32
values, and the forward is still the dequantized base plus the held update, to the round-off of
the compute dtype.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fake_coordinator import random_adapter, tiny_spec  # noqa: E402
from flora.client.config import ClientSettings  # noqa: E402
from flora.client.local import load_base, load_local_model  # noqa: E402
from flora.client.local_weights import HeldUpdate, local_weights  # noqa: E402
from flora.client.sync import expected_shapes  # noqa: E402
from flora.common.basemodel import BUILTIN_MODEL, fingerprint, load_model, load_tokenizer  # noqa: E402
from flora.common.data import Example  # noqa: E402
from flora.common.quantize import dequantized_weight, is_quantized  # noqa: E402
from flora.common.update import module_delta  # noqa: E402

CPU = torch.device("cpu")
BF16_EPS = 2.0**-8  # bf16's machine epsilon (8 significand bits)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """The built-in model saved as a bf16 checkpoint (as real instruct models ship), and its run spec."""
    folder = tmp_path_factory.mktemp("bf16-model")
    load_model(BUILTIN_MODEL).to(torch.bfloat16).save_pretrained(folder)
    load_tokenizer(BUILTIN_MODEL).save_pretrained(folder)
    spec = tiny_spec()
    spec.base_model = str(folder)
    spec.base_model_hash = fingerprint(load_model(str(folder)), expected_shapes(spec))  # the float32 load's
    return folder, spec


def settings_for(tmp_path, quantize: str) -> ClientSettings:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    return ClientSettings(name="a", data=[data], quantize=quantize, device="cpu")


def test_a_quantized_client_reads_the_checkpoint_in_its_own_dtype_a_full_precision_one_in_float32(
    bf16_checkpoint, tmp_path
):
    folder, spec = bf16_checkpoint
    name = spec.target_modules[0].name
    assert load_base(settings_for(tmp_path, "nf4"), str(folder)).get_submodule(name).weight.dtype == torch.bfloat16
    assert load_base(settings_for(tmp_path, "none"), str(folder)).get_submodule(name).weight.dtype == torch.float32


def test_from_a_bf16_checkpoint_the_fingerprint_is_the_servers_and_the_forward_is_exact(bf16_checkpoint, tmp_path):
    folder, spec = bf16_checkpoint
    loaded = load_local_model(settings_for(tmp_path, "nf4"), spec, ([Example("", "x")], []))
    assert loaded.digest == spec.base_model_hash and isinstance(loaded.weights, HeldUpdate)
    local = loaded.weights
    local.apply([random_adapter(spec, 4, 1.0, seed=1).pairs])
    x = torch.randn(3, spec.target_modules[0].in_features, generator=torch.Generator().manual_seed(0))
    for name in local.names:
        module = local.model.get_submodule(name)
        assert is_quantized(module)
        want = x @ (dequantized_weight(module) + module_delta(local.held[name])).T
        assert torch.allclose(module(x), want, atol=1e-5, rtol=1e-4)  # float32 compute: float32 round-off


def test_no_parameter_of_a_quantized_base_still_shares_the_loaded_checkpoints_memory(bf16_checkpoint):
    """A tensor left as loaded keeps the memory-mapped checkpoint resident: the whole bf16 model
    beside the 4-bit one. Embeddings, norms and head are copied even when already in the compute dtype."""
    folder, spec = bf16_checkpoint
    model = load_model(str(folder), dtype="auto")
    loaded = {id(p): p.untyped_storage().data_ptr() for p in model.parameters()}
    local = local_weights(model, expected_shapes(spec), "nf4", torch.bfloat16, CPU)
    kept = [name for name, p in local.model.named_parameters()
            if p.dtype.is_floating_point and p.untyped_storage().data_ptr() == loaded.get(id(p))]
    assert kept == []


def test_dense_held_sums_live_in_the_compute_dtype_and_the_forward_is_exact_to_its_round_off():
    spec = tiny_spec()
    local = local_weights(load_model(BUILTIN_MODEL), expected_shapes(spec), "nf4", torch.bfloat16, CPU)
    # Dense, of the base weights' size (theirs are about 0.03), so that it outweighs bf16's round-off.
    update = {name: module_delta(pair) * 300 for name, pair in random_adapter(spec, 4, 1.0, seed=2).pairs.items()}
    local.apply([update, random_adapter(spec, 3, 1.0, seed=3).pairs])  # dense, then factors folded into it
    assert {part.dtype for part in local.held.values()} == {torch.bfloat16}
    x = torch.randn(5, spec.target_modules[0].in_features, generator=torch.Generator().manual_seed(1))
    for name in local.names:
        module = local.model.get_submodule(name)
        weight, delta = dequantized_weight(module), local.held[name].float()
        got = module(x.to(torch.bfloat16)).float()
        xb = x.to(torch.bfloat16).float()
        want = xb @ (weight + delta).T
        # Each term is rounded to bf16 at most a few times (weight, update, product, sum): a bound
        # on |x| |W|^T + |x| |D|^T that holds whatever order the CPU's kernels accumulate in.
        bound = 8 * BF16_EPS * (xb.abs() @ (weight.abs() + delta.abs()).T) + 1e-6
        assert bool(((got - want).abs() <= bound).all())
        assert (want - xb @ weight.T).abs().max() > 2 * bound.max()  # the update is not lost in that round-off


def test_a_restored_dense_sum_takes_the_compute_dtype_of_the_client_restoring_it():
    spec = tiny_spec()
    saved = {name: module_delta(pair) for name, pair in random_adapter(spec, 4, 1.0, seed=4).pairs.items()}  # float32
    local = local_weights(load_model(BUILTIN_MODEL), expected_shapes(spec), "nf4", torch.bfloat16, CPU)
    local.restore(saved)
    assert all(local.held[n].dtype == torch.bfloat16 for n in saved)
    assert all(torch.equal(local.held[n], saved[n].to(torch.bfloat16)) for n in saved)
