"""The simulated federation's data: one tokenised training set per client, one validation set.

Each client reads its own file exactly as a daemon does (``flora.common.data``); the simulation
then carves a fixed validation set out of every client's share (or reads an eval file), so that
every method is scored on the same held-out examples drawn from the federation's own mixture.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora.common.data import Conversation, Example, TokenizedExample, data_folder, load_examples, split_examples, tokenize_examples
from flora.demo.sample_data import write_sample_data
from flora.sim.engine import ClientData, derive_seed



@dataclass(frozen=True)
class DataOptions:
    """How client files become training and validation sets."""

    template: str = "alpaca"
    cutoff: int = 256
    mask_prompt: bool = False
    examples_per_client: int | None = None  # subsample each file to this many (before the validation carve)
    validation_fraction: float = 0.1  # of each client's examples, when there is no eval file
    seed: int = 0
    data_format: str = "auto"  # the record form, forced; auto: detected per file
    fields: tuple[str, ...] = ()  # column mapping, FORM_KEY=YOUR_KEY each


@dataclass(frozen=True)
class Federation:
    """The clients' training data and the shared validation set."""

    clients: list[ClientData]
    validation: list[TokenizedExample]
    fully_masked: int  # training examples with no labelled token (a prompt filling the cutoff, when masked)

    def summary(self) -> dict[str, Any]:
        """Sizes, for reports."""
        return {
            "clients": len(self.clients),
            "train_examples": [len(c.train) for c in self.clients],
            "validation_examples": len(self.validation),
            "fully_masked_train_examples": self.fully_masked,
        }


def client_files(data_dir: Path) -> list[Path]:
    """The client files of ``data_dir`` (see flora.common.data.data_folder), one per client."""
    clients, _ = data_folder(data_dir)
    return clients


def sample_files(out_dir: Path, clients: int, per_client: int, seed: int) -> list[Path]:
    """Generate the built-in non-IID sample data (the demo's), one file per client."""
    paths, _ = write_sample_data(out_dir, clients, per_client=per_client, validation=1, seed=seed)
    return paths


def subsample(examples: list[Example | Conversation], count: int | None, seed: int) -> list[Example | Conversation]:
    """A seeded subset of ``count`` examples in file order (all of them when there are fewer)."""
    if count is None or count >= len(examples):
        return examples
    keep = set(random.Random(seed).sample(range(len(examples)), count))
    return [example for i, example in enumerate(examples) if i in keep]


def load_federation(files: list[Path], tokenizer: Any, options: DataOptions, eval_file: Path | None = None) -> Federation:
    """Read, subsample, split and tokenise every client's file (and the eval file, if given)."""
    tokenize = functools.partial(tokenize_examples, tokenizer=tokenizer, cutoff=options.cutoff, mask_prompt=options.mask_prompt)
    load = functools.partial(load_examples, template=options.template, data_format=options.data_format, fields=options.fields)
    clients, held_out = [], []
    for k, path in enumerate(files):
        examples = load(path)
        examples = subsample(examples, options.examples_per_client, derive_seed(options.seed, "subsample", k))
        if eval_file is None:
            seed = derive_seed(options.seed, "validation", k)
            examples, carved = split_examples(examples, options.validation_fraction, seed=seed)
            held_out.extend(carved)
        clients.append(ClientData(path.stem, tokenize(examples)))
    if eval_file is not None:
        held_out = load(eval_file)
    fully_masked = sum(1 for client in clients for example in client.train if example.labelled == 0)
    return Federation(clients, tokenize(held_out), fully_masked)
