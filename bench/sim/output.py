"""What a simulation leaves behind: the round history as JSON lines, tables and a loss plot.

Runs are keyed by a label (the method for ``flora-sim``, an experiment name such as
"flora-hetero" for ``bench/quality.py``), so one table or plot compares several runs by round.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from flora.sim.engine import RoundRecord

Runs = Mapping[str, Sequence[RoundRecord]]


def write_record(stream: IO[str], record: RoundRecord) -> None:
    """Append one history line and flush, so that an interrupted run keeps its finished rounds."""
    stream.write(json.dumps(record.to_json()) + "\n")
    stream.flush()


def by_round(runs: Runs, field: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (one per round, a column per run) of one record field, and the column names."""
    rounds = sorted({record.round for records in runs.values() for record in records})
    rows = [{"round": number} for number in rounds]
    for label, records in runs.items():
        values = {record.round: getattr(record, field) for record in records}
        for row in rows:
            value = values.get(row["round"])
            row[label] = "-" if value is None else value
    return rows, ["round", *runs]


def format_errors(runs: Runs) -> list[dict[str, Any]]:
    """Aggregation errors by round in scientific notation (round-off and cross terms are orders of magnitude apart)."""
    rows, _ = by_round(runs, "aggregation_error")
    return [{k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows]


def plot_validation_loss(runs: Runs, path: Path, title: str) -> None:
    """One line per run: validation loss of the global model by round (round 0 = the base model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, records in runs.items():
        points = [(r.round, r.validation_loss) for r in records if r.validation_loss is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xlabel="round", ylabel="validation loss (token-weighted cross-entropy)", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
