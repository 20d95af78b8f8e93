"""Built-in sample data: small generated instruction tasks, split non-IID across clients.

Each client holds one task (by default only that one: ``main_share``), in Dolly or Alpaca form
alternately, so that the federation sees the skewed, heterogeneous data it exists for and no
client alone can teach what the others hold. The tasks
build on what the built-in model read in pre-training (``flora.demo.corpus``): it has read people
counting up, down and in twos ("They counted down 41 40 39."), but never been asked to; what it
lacks is the instruction format, and each client teaches one of the three. The validation file
mixes every task evenly and starts only from numbers no client trained on. Everything is
generated from a seed: no download, identical on every machine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

Example = tuple[str, str, str]  # instruction, input, output


def _split(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training items, held-out items): every third item, in sorted order, is held out."""
    ordered = sorted(items)
    return [x for i, x in enumerate(ordered) if i % 3 != 2], [x for i, x in enumerate(ordered) if i % 3 == 2]


NUMBERS = _split([str(n) for n in range(13, 94)])  # what every count below stays within two digits for


def _counted(instruction: str, step: int) -> Callable[[random.Random, bool], Example]:
    """A counting task: the next three numbers from the input, ``step`` apart."""
    def make(rng: random.Random, held_out: bool) -> Example:
        start = int(rng.choice(NUMBERS[held_out]))
        return instruction, str(start), " ".join(str(start + step * k) for k in (1, 2, 3))
    return make


TASKS: dict[str, Callable[[random.Random, bool], Example]] = {
    "count": _counted("Count on from the number.", 1),
    "countdown": _counted("Count down from the number.", -1),
    "twos": _counted("Count on in twos from the number.", 2),
}


def _record(example: Example, form: str) -> dict[str, str]:
    instruction, context, answer = example
    if form == "dolly":
        return {"instruction": instruction, "context": context, "response": answer}
    return {"instruction": instruction, "input": context, "output": answer}


def client_examples(client: int, count: int, seed: int, main_share: float = 1.0) -> list[Example]:
    """Examples of one client: ``main_share`` of its own task, the rest drawn from all tasks.

    1.0 by default: with even a tenth of the other tasks, one client alone learns all three.
    """
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
