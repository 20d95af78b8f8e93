"""What a simulation leaves behind: the round history as JSON lines, tables and a loss plot.

Runs are keyed by a label (the method for ``flora-sim``, an experiment name such as
"flora-hetero" for ``bench/quality.py``) and hold that label's records of every seed, so one
table or plot compares several runs by round, as the mean over seeds with its spread.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flora.sim.engine import RoundRecord

Runs = Mapping[str, Sequence[RoundRecord]]


@dataclass(frozen=True)
class Spread:
    """One field at one round over the seeds."""

    mean: float
    std: float  # sample standard deviation (0 for a single seed)
    low: float
    high: float
    seeds: int

    def __str__(self) -> str:
        return f"{self.mean:.4f}" if self.seeds == 1 else f"{self.mean:.4f} ± {self.std:.4f}"


def write_record(stream: IO[str], record: RoundRecord) -> None:
    """Append one history line and flush, so that an interrupted run keeps its finished rounds."""
    stream.write(json.dumps(record.to_json()) + "\n")
    stream.flush()


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample standard deviation and range of one round's values over the seeds."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Spread(statistics.fmean(values), std, min(values), max(values), len(values))


def round_spreads(records: Sequence[RoundRecord], field: str) -> dict[int, Spread]:
    """{round: spread of ``field`` over the seeds}, for the rounds where the field has values."""
    values: dict[int, list[float]] = {}
    for record in records:
        value = getattr(record, field)
        if value is not None and math.isfinite(value):
            values.setdefault(record.round, []).append(value)
    return {number: spread(v) for number, v in sorted(values.items())}


def by_round(runs: Runs, field: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (one per round, a column per run) of one field's mean over seeds ("± std" with several)."""
    rounds = sorted({record.round for records in runs.values() for record in records})
    rows = [{"round": number} for number in rounds]
    for label, records in runs.items():
        spreads = round_spreads(records, field)
        for row in rows:
            cell = spreads.get(row["round"])
            row[label] = "-" if cell is None else (cell.mean if cell.seeds == 1 else str(cell))
    return rows, ["round", *runs]


def format_errors(runs: Runs) -> list[dict[str, Any]]:
    """Aggregation errors by round (mean over seeds) in scientific notation: round-off and cross terms differ by orders."""
    rounds = sorted({record.round for records in runs.values() for record in records})
    rows = [{"round": number} for number in rounds]
    for label, records in runs.items():
        spreads = round_spreads(records, "aggregation_error")
        for row in rows:
            cell = spreads.get(row["round"])
            row[label] = "-" if cell is None else f"{cell.mean:.2e}"
    return rows


def plot_validation_loss(runs: Runs, path: Path, title: str, first_round: int = 0) -> None:
    """One line per run (mean over seeds) with a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, records in runs.items():
        spreads = {t: s for t, s in round_spreads(records, "validation_loss").items() if t >= first_round}
        if not spreads:
            continue
        rounds = list(spreads)
        (line,) = ax.plot(rounds, [s.mean for s in spreads.values()], marker="o", markersize=3, label=label)
        if any(s.seeds > 1 for s in spreads.values()):
            ax.fill_between(rounds, [s.low for s in spreads.values()], [s.high for s in spreads.values()],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set(xlabel="round", ylabel="validation loss (token-weighted cross-entropy)", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
