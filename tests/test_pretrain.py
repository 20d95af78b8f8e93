"""The pre-training script of the built-in model (smoke mode, as CI runs it) and its weight files."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from flora.common.basemodel import build_tiny_llama, build_tokenizer
from flora.common.builtin_weights import load_builtin_weights, read_record, weights_fingerprint
from flora.demo.corpus import paragraphs
from flora.demo.pretrain import PretrainConfig, lr_at, main
from flora.demo.sample_data import TASKS


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """What CI's smoke run of the script writes: a few steps, into a folder of its own."""
    out = tmp_path_factory.mktemp("pretrain")
    main(["--smoke", "--out", str(out)])
    return out


@pytest.mark.slow
def test_smoke_run_writes_weights_that_load_to_their_recorded_fingerprint(smoke_run):
    record = read_record(smoke_run)
    assert record["steps"] == 3 and record["seed"] == 0 and "--smoke" in record["command"]
    assert 0 < record["train_loss"] < 10 and 0 < record["held_out_loss"] < 10
    model = build_tiny_llama(len(build_tokenizer()))
    untrained = weights_fingerprint(model)
    load_builtin_weights(model, smoke_run)
    assert weights_fingerprint(model) == record["fingerprint"] != untrained


@pytest.mark.slow
def test_weights_that_do_not_match_their_record_are_refused(smoke_run, tmp_path):
    shutil.copytree(smoke_run, tmp_path, dirs_exist_ok=True)
    notes = tmp_path / "flora-tiny-llama.json"
    notes.write_text(json.dumps({**read_record(tmp_path), "fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="fingerprint .* is not the recorded 0000"):
        load_builtin_weights(build_tiny_llama(len(build_tokenizer())), tmp_path)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    config = PretrainConfig(steps=100, warmup_steps=10, learning_rate=1.0)
    assert lr_at(0, config) < lr_at(9, config) <= 1.0
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(100, config) == pytest.approx(0.1)


def test_corpus_is_seeded_and_never_holds_the_tasks_instructions():
    first, again = paragraphs(0), paragraphs(0)
    texts = [next(first) for _ in range(2000)]
    assert texts == [next(again) for _ in range(2000)]
    corpus = "\n".join(texts)
    for make in TASKS.values():
        instruction = make(random.Random(0), False)[0]
        assert instruction not in corpus
    assert "?" not in corpus and "###" not in corpus
