"""Independent oracles from PEFT: its "cat" combination is FLoRA stacking, its forward is the merge."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from flora.common.aggregation import flora_stack
from flora.common.basemodel import DEFAULT_TARGET_MODULES, target_module_shapes
from flora.common.lora import LoraAdapter, LoraPair, lora_scaling
from flora.common.merge import merge_into_model, merge_into_state_dict, merged_temporarily

CLIENTS = [("c0", 8, 16.0, False), ("c1", 4, 4.0, False), ("c2", 2, 7.0, False)]


def peft_with_adapters(model, clients):
    """A PEFT model holding one randomly initialised (B non-zero) adapter per client."""
    torch.manual_seed(0)
    peft_model = None
    for name, rank, alpha, rslora in clients:
        config = LoraConfig(
            r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=list(DEFAULT_TARGET_MODULES), init_lora_weights=False
        )
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    return peft_model


def extract(peft_model, adapter_name: str, module_names, scaling: float) -> LoraAdapter:
    """Our LoraAdapter view of one of PEFT's adapters."""
    pairs = {}
    for name in module_names:
        layer = peft_model.base_model.model.get_submodule(name)
        pairs[name] = LoraPair(layer.lora_A[adapter_name].weight.detach().clone(), layer.lora_B[adapter_name].weight.detach().clone())
    return LoraAdapter(pairs, scaling)


def test_flora_stack_equals_peft_cat_combination(tiny_model):
    names = list(target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES))
    peft_model = peft_with_adapters(tiny_model, CLIENTS)
    ours = [extract(peft_model, n, names, lora_scaling(r, a, rs)) for n, r, a, rs in CLIENTS]
    weights = [0.5, 0.3, 0.2]

    peft_model.add_weighted_adapter([n for n, *_ in CLIENTS], weights, "cat", combination_type="cat")
    stacked = flora_stack(ours, weights)

    for name in names:
        layer = peft_model.base_model.model.get_submodule(name)
        torch.testing.assert_close(stacked.pairs[name].a, layer.lora_A["cat"].weight.detach())
        torch.testing.assert_close(stacked.pairs[name].b, layer.lora_B["cat"].weight.detach())
        torch.testing.assert_close(stacked.delta(name), layer.get_delta_weight("cat").detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_model_matches_peft_forward_with_adapter_attached(tiny_model, rslora):
    names = list(target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES))
    reference = type(tiny_model)(tiny_model.config)
    reference.load_state_dict(tiny_model.state_dict())
    peft_model = peft_with_adapters(tiny_model, [("c", 4, 6.0, rslora)])
    adapter = extract(peft_model, "c", names, lora_scaling(4, 6.0, rslora))
    tokens = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        expected = peft_model(input_ids=tokens).logits
        merge_into_model(reference, adapter)
        actual = reference(input_ids=tokens).logits

    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_merge_into_state_dict_matches_merge_into_model(tiny_model):
    names = list(target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES))
    gen = torch.Generator().manual_seed(3)
    shapes = target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES)
    adapter = LoraAdapter({n: LoraPair(torch.randn(3, shapes[n][1], generator=gen), torch.randn(shapes[n][0], 3, generator=gen)) for n in names}, 0.5)
    merged_sd = merge_into_state_dict(tiny_model.state_dict(), adapter)
    merge_into_model(tiny_model, adapter)
    for key, value in tiny_model.state_dict().items():
        torch.testing.assert_close(merged_sd[key], value, rtol=0, atol=0)


def test_merge_in_half_precision_computes_in_float32(tiny_model):
    name = next(iter(target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES)))
    weight = tiny_model.get_submodule(name).weight.detach().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, weight.shape[1], generator=gen), torch.randn(weight.shape[0], 2, generator=gen)
    adapter = LoraAdapter({name: LoraPair(a.to(torch.bfloat16), b.to(torch.bfloat16))}, 0.01)
    merged = merge_into_state_dict({f"{name}.weight": weight}, adapter)[f"{name}.weight"]
    assert merged.dtype == torch.bfloat16
    exact = (weight.float() + 0.01 * (b.to(torch.bfloat16).float() @ a.to(torch.bfloat16).float())).to(torch.bfloat16)
    # Float32 arithmetic rounded once to bf16: equal but for a rare tie of rounding order (one bf16
    # ulp, which BLAS kernels decide differently per CPU). Arithmetic in bf16 rounds three times
    # (product, scaling, sum) and misses a far larger share of entries; how many depends on the
    # CPU's bf16 kernels, so only the merge's own result is bounded here.
    torch.testing.assert_close(merged.float(), exact.float(), rtol=2**-7, atol=0)
    assert (merged != exact).float().mean() < 1e-3


def test_merge_refuses_non_finite_results_and_leaves_the_model_untouched(tiny_model):
    names = list(target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    shapes = target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES)
    pairs = {n: LoraPair(torch.ones(1, shapes[n][1]), torch.ones(shapes[n][0], 1)) for n in names}
    last = names[-1]
    pairs[last] = LoraPair(torch.full((1, shapes[last][1]), float("inf")), torch.ones(shapes[last][0], 1))
    with pytest.raises(ValueError, match="non-finite"):
        merge_into_model(tiny_model, LoraAdapter(pairs, 1.0))
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_merge_rejects_shape_and_name_mismatches(tiny_model):
    shapes = target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES)
    name = next(iter(shapes))
    wrong = LoraAdapter({name: LoraPair(torch.zeros(2, shapes[name][1] + 1), torch.zeros(shapes[name][0], 2))})
    with pytest.raises(ValueError, match="adapter delta is"):
        merge_into_model(tiny_model, wrong)
    missing = LoraAdapter({"model.nowhere": LoraPair(torch.zeros(2, 3), torch.zeros(3, 2))})
    with pytest.raises(KeyError, match="model.nowhere"):
        merge_into_state_dict(tiny_model.state_dict(), missing)


def test_merged_temporarily_restores_the_exact_weights_even_on_error(tiny_model):
    shapes = target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES)
    gen = torch.Generator().manual_seed(5)
    adapter = LoraAdapter({n: LoraPair(torch.randn(2, d_in, generator=gen), torch.randn(d_out, 2, generator=gen)) for n, (d_out, d_in) in shapes.items()}, 0.3)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    expected = merge_into_state_dict(before, adapter)
    with pytest.raises(RuntimeError, match="inside"):
        with merged_temporarily(tiny_model, adapter):
            for key, value in tiny_model.state_dict().items():
                assert torch.equal(value, expected[key]), key
            raise RuntimeError("inside")
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_exported_factors_of_their_own_rank_per_module_load_in_peft_exactly(tmp_path, tiny_model):
    from peft import PeftModel

    from flora.common.basemodel import BUILTIN_MODEL, load_model
    from flora.common.merge import merged_update, module_weights
    from flora.server.export import save_peft_adapter

    shapes = target_module_shapes(tiny_model, DEFAULT_TARGET_MODULES)
    gen = torch.Generator().manual_seed(3)
    factors = {name: LoraPair(torch.randn(1 + k, d_in, generator=gen) * 0.02, torch.randn(d_out, 1 + k, generator=gen) * 0.02)
               for k, (name, (d_out, d_in)) in enumerate(sorted(shapes.items()))}  # ranks 1, 2, ..., all different
    save_peft_adapter(tmp_path / "adapter", factors, target_modules=list(DEFAULT_TARGET_MODULES), base_model=BUILTIN_MODEL)
    peft_model = PeftModel.from_pretrained(load_model(BUILTIN_MODEL), tmp_path / "adapter").eval()
    expected = load_model(BUILTIN_MODEL)
    merged = merged_update(module_weights(expected, sorted(shapes)), factors)
    with torch.no_grad():
        for name, weight in module_weights(expected, sorted(shapes)).items():
            weight.copy_(merged[name])
        tokens = torch.arange(1, 30).unsqueeze(0)
        torch.testing.assert_close(peft_model(tokens).logits, expected(tokens).logits, rtol=1e-4, atol=1e-5)
