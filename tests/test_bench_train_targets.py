"""bench/train.py's plain PEFT loop adapts the family's default target modules, as train_lora does.

It used to name q_proj and v_proj for every model, which a Phi-3 (fused qkv_proj) or a GPT-2
(c_attn) does not have: the baseline failed, or compared different layers than flora trains.
"""

from __future__ import annotations

from argparse import Namespace

import pytest

from bench.train import run_baseline, run_ours
from flora.common.data import TokenizedExample
from tiny_families import build_family


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_both_loops_train_the_familys_default_targets(family):
    model = build_family(family)
    args = Namespace(rank=2, steps=1, batch_size=2, device="cpu")
    chunks = [TokenizedExample(tuple(range(3, 19)))] * 2
    assert run_baseline(model, chunks, args)[0] == 32
    assert run_ours(model, chunks, args)[0] == 32
