"""Plain-text tables for the command-line tools (demo, simulator, benchmarks).

One formatter, Markdown-shaped, so that what a tool prints in a terminal can be pasted into an
issue or a report unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows (mappings from column to value) as a Markdown table; floats get 4 significant digits."""
    body = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in body)]) for i, col in enumerate(columns)]  # no rows: header widths

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in body)])
