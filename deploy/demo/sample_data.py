"""Built-in sample data: small generated instruction tasks, split non-IID across clients.

Each client mostly holds one task (arithmetic, word order, capital letters, sorting, capitals of
countries, counting) and a little of the others, in Dolly or Alpaca form alternately, so that
the federation sees the skewed, heterogeneous data it exists for. The validation file mixes
every task evenly. Everything is generated from a seed: no download, identical on every machine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

Example = tuple[str, str, str]  # instruction, input, output

_WORDS = (
    "red green blue river stone light cloud apple tiger paper music garden winter summer "
    "silver window forest yellow orange purple rabbit bridge castle dragon"
).split()
_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Cuba": "Havana",
    "India": "New Delhi", "China": "Beijing", "Russia": "Moscow", "Brazil": "Brasilia", "Ireland": "Dublin",
}


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _reverse(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def _upper(rng: random.Random) -> Example:
    text = " ".join(rng.sample(_WORDS, rng.randint(2, 4)))
    return "Write the text in capital letters.", text, text.upper()


def _sort(rng: random.Random) -> Example:
    numbers = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
    return "Sort the numbers from smallest to largest.", " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


def _capital(rng: random.Random) -> Example:
    country = rng.choice(sorted(_CAPITALS))
    return f"What is the capital of {country}?", "", f"The capital of {country} is {_CAPITALS[country]}."


def _count(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(2, 7))
    return "How many words does the text have?", " ".join(words), str(len(words))


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add,
    "reverse": _reverse,
    "upper": _upper,
    "sort": _sort,
    "capital": _capital,
    "count": _count,
}


def _record(example: Example, form: str) -> dict[str, str]:
    instruction, context, answer = example
    if form == "dolly":
        return {"instruction": instruction, "context": context, "response": answer}
    return {"instruction": instruction, "input": context, "output": answer}


def client_examples(client: int, count: int, seed: int, main_share: float = 0.8) -> list[Example]:
    """Examples of one client: ``main_share`` of its own task, the rest drawn from all tasks."""
    rng = random.Random(f"{seed}-client-{client}")
    names = sorted(TASKS)
    main = names[client % len(names)]
    return [TASKS[main if rng.random() < main_share else rng.choice(names)](rng) for _ in range(count)]


def write_sample_data(out_dir: Path, clients: int, per_client: int = 240, validation: int = 120, seed: int = 0) -> tuple[list[Path], Path]:
    """Write ``client_<k>.json`` per client (Dolly and Alpaca forms alternate) and ``validation.json``."""
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
    names = sorted(TASKS)
    held_out = [_record(TASKS[names[i % len(names)]](rng), "alpaca") for i in range(validation)]
    val_path = out_dir / "validation.json"
    val_path.write_text(json.dumps(held_out, indent=1) + "\n")
    return paths, val_path
