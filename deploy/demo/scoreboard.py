"""The demo's last word: held-out completions and exact-match scores, readable for any data.

Every cell is one line cut with an ellipsis (Dolly prompts span paragraphs; a newline inside a
cell breaks a Markdown table), a completion carries a mark saying whether it is exactly the
expected answer, and each task ends in one line of fixed form that scripts read:

    task <name>: base <b>/<n>, best single client <c>/<n>, merged <m>/<n>
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flora.common.tables import format_table
from flora.demo.completions import HeldOut, exact

BASE, MERGED = "base model (before)", "merged model (after)"
RIGHT, WRONG = "✓", "✗"


def one_line(text: str, width: int = 40) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``width`` with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1].rstrip() + "…"


def marked(answer: str, item: HeldOut, width: int = 32) -> str:
    """A completion cut to one line, with ✓ when it is exactly the expected answer, else ✗."""
    return f"{RIGHT if exact(answer, item) else WRONG} {one_line(answer, width) or '(no text)'}"


def completion_rows(items: Sequence[HeldOut], answers: Mapping[str, Sequence[str]], per_task: int = 2) -> list[dict[str, str]]:
    """The first ``per_task`` prompts of each task, with the base's and the merged model's answers."""
    rows, shown = [], dict[str, int]()
    for i, item in enumerate(items):
        shown[item.task] = shown.get(item.task, 0) + 1
        if shown[item.task] <= per_task:
            rows.append({"task": one_line(item.task, 20), "held-out prompt": one_line(item.question),
                         "expected": one_line(item.expected, 32), BASE: marked(answers[BASE][i], item),
                         MERGED: marked(answers[MERGED][i], item)})
    return rows


def scores(items: Sequence[HeldOut], answers: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    """Per model label, per task: how many held-out prompts it answered exactly."""
    return {label: {task: sum(exact(a, it) for a, it in zip(said, items) if it.task == task) for task in tasks(items)}
            for label, said in answers.items()}


def tasks(items: Sequence[HeldOut]) -> dict[str, int]:
    """Tasks in order of appearance, with their number of held-out prompts."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.task] = counts.get(item.task, 0) + 1
    return counts


def score_table(items: Sequence[HeldOut], answers: Mapping[str, Sequence[str]]) -> str:
    """One row per model (base, each client alone, merged), one column per task: exact matches / n."""
    counts, by_model = tasks(items), scores(items, answers)
    rows = [{"model": label, **{one_line(t, 20): f"{by_model[label][t]}/{n}" for t, n in counts.items()}} for label in answers]
    return format_table(rows, ["model", *(one_line(t, 20) for t in counts)])


def accuracy_lines(items: Sequence[HeldOut], answers: Mapping[str, Sequence[str]]) -> list[str]:
    """``task <name>: base <b>/<n>, best single client <c>/<n>, merged <m>/<n>`` per task."""
    by_model = scores(items, answers)
    singles = [label for label in answers if label not in (BASE, MERGED)]
    lines = []
    for task, n in tasks(items).items():
        best = max((by_model[label][task] for label in singles), default=0)
        lines.append(f"task {task}: base {by_model[BASE][task]}/{n}, best single client {best}/{n}, merged {by_model[MERGED][task]}/{n}")
    return lines
