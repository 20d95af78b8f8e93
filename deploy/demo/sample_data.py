"""Built-in sample data: small generated instruction tasks, split non-IID across clients.

Each client mostly holds one task and a little of the others, in Dolly or Alpaca form
alternately, so that the federation sees the skewed, heterogeneous data it exists for. The tasks
build on what the built-in model read in pre-training (``flora.demo.corpus``): it knows capitals
and opposites as prose, and has seen words in capital letters; what it lacks is the instruction
format. The validation file mixes every task evenly and asks only about countries and words no
client trained on. Everything is generated from a seed: no download, identical on every machine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from flora.demo.vocabulary import CAPITALS, OPPOSITES, WORDS

Example = tuple[str, str, str]  # instruction, input, output


def _split(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training items, held-out items): every third item, in sorted order, is held out."""
    ordered = sorted(items)
    return [x for i, x in enumerate(ordered) if i % 3 != 2], [x for i, x in enumerate(ordered) if i % 3 == 2]


COUNTRIES = _split(CAPITALS)
OPPOSITE_WORDS = _split(OPPOSITES)


def _capital(rng: random.Random, held_out: bool) -> Example:
    country = rng.choice(COUNTRIES[held_out])
    return f"What is the capital of {country}?", "", CAPITALS[country]


def _opposite(rng: random.Random, held_out: bool) -> Example:
    return "Give the opposite of the word.", (word := rng.choice(OPPOSITE_WORDS[held_out])), OPPOSITES[word]


def _upper(rng: random.Random, held_out: bool) -> Example:
    text = " ".join(rng.sample(WORDS, rng.randint(2, 3)))
    return "Write the text in capital letters.", text, text.upper()


TASKS: dict[str, Callable[[random.Random, bool], Example]] = {
    "capital": _capital,
    "opposite": _opposite,
    "upper": _upper,
}


def _record(example: Example, form: str) -> dict[str, str]:
    instruction, context, answer = example
    if form == "dolly":
        return {"instruction": instruction, "context": context, "response": answer}
    return {"instruction": instruction, "input": context, "output": answer}


def client_examples(client: int, count: int, seed: int, main_share: float = 0.9) -> list[Example]:
    """Examples of one client: ``main_share`` of its own task, the rest drawn from all tasks."""
    rng = random.Random(f"{seed}-client-{client}")
    names = list(TASKS)
    main = names[client % len(names)]
    return [TASKS[main if rng.random() < main_share else rng.choice(names)](rng, False) for _ in range(count)]


def _distinct(make: Callable[[random.Random, bool], Example], rng: random.Random, count: int) -> list[Example]:
    """Up to ``count`` different held-out examples of a task (fewer where it has fewer)."""
    found: dict[Example, None] = {}
    for _ in range(50 * count):
        if len(found) == count:
            break
        found.setdefault(make(rng, True))
    return list(found)


def write_sample_data(out_dir: Path, clients: int, per_client: int = 240, validation: int = 12, seed: int = 0) -> tuple[list[Path], Path]:
    """Write ``client_<k>.json`` per client (Dolly and Alpaca forms alternate) and ``validation.json``:
    up to ``validation`` different held-out examples per task, Dolly form, ``category`` naming the task."""
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(clients):
        form = "dolly" if k % 2 == 0 else "alpaca"
        records = [_record(e, form) for e in client_examples(k, per_client, seed)]
        path = out_dir / f"client_{k}.json"
        path.write_text(json.dumps(records, indent=1) + "\n")
        paths.append(path)
    rng = random.Random(f"{seed}-validation")
    held_out = [{**_record(example, "dolly"), "category": name}
                for name, make in TASKS.items() for example in _distinct(make, rng, validation)]
    val_path = out_dir / "validation.json"
    val_path.write_text(json.dumps(held_out, indent=1) + "\n")
    return paths, val_path
