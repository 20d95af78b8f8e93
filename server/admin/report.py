"""``flora-admin report STATE_DIR``: a run's history as a picture and a markdown summary.

Read from ``history.jsonl`` (the run's durable record) and, under differential privacy,
``dp_releases.jsonl`` (noisy passes sent outside a committed round), so it works on a live run,
a finished one, or a copy of a state directory on another machine. The markdown needs nothing
beyond the standard library; the PNG needs matplotlib, an optional extra
(``pip install 'flora-fl[report]'``), because servers and clients never draw.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora.common.tables import format_table
from flora.demo.monitor import COLUMNS, read_history, round_rows
from flora.server.dp_releases import Release, ReleaseFileError, outside_commits, read_releases
from flora.server.layout import Layout

PNG_NAME = "report.png"
MARKDOWN_NAME = "report.md"
MATPLOTLIB_HINT = "the PNG needs matplotlib: pip install 'flora-fl[report]'"
SECONDS_NOTE = ("\"seconds\" is the wall-clock time from the previous commit to this one: waiting for clients, "
                "training, uploads, aggregation and any time the server was down, not training alone.")


class ReportError(ValueError):
    """The state directory has nothing to report, or the picture cannot be drawn."""


@dataclass(frozen=True)
class Report:
    """What ``write_report`` wrote (``png`` is None when matplotlib is missing)."""

    markdown: Path
    png: Path | None


def has_matplotlib() -> bool:
    """Whether the optional plotting library is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def _rounds(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in history if r.get("round", 0) > 0]


def summary_markdown(history: Sequence[dict[str, Any]], state_dir: Path, png: Path | None,
                     releases: Sequence[Release] = ()) -> str:
    """The markdown summary: what ran, the per-round table, the loss change, where the model is."""
    rounds = _rounds(history)
    names = sorted({c["name"] for r in rounds for c in r.get("clients", [])})
    lines = [f"# flora run report: {state_dir}", "",
             f"{len(rounds)} rounds committed; clients: {', '.join(names) or 'none'}.", ""]
    if png is not None:
        lines += [f"![losses, bytes and participants per round]({png.name})", ""]
    lines += [format_table(round_rows(history), COLUMNS), "", SECONDS_NOTE, ""]
    losses = [r["validation_loss"] for r in history if r.get("validation_loss") is not None]
    if len(losses) >= 2:
        lines += [f"Validation loss of the merged model: {losses[0]:.4f} -> {losses[-1]:.4f}.", ""]
    lines += privacy_lines(rounds, releases)
    lines += secure_lines(rounds)
    checkpoints = [r["checkpoint"] for r in rounds if r.get("checkpoint")]
    if checkpoints:
        lines += [f"Latest merged checkpoint: `{state_dir / checkpoints[-1]}`.", ""]
    return "\n".join(lines)


def privacy_lines(rounds: Sequence[dict[str, Any]], releases: Sequence[Release] = ()) -> list[str]:
    """Under differential privacy: the (epsilon, delta) the run spent, and after which round or
    released pass outside a commit (server/dp_releases.py) how much."""
    private = [r for r in rounds if "dp_epsilon" in r]
    outside = outside_commits(releases, private)
    if not private and not outside:
        return []
    rows = [((r["round"], 1), {"round": r["round"], "sampled": f"{r['dp_selected']} of {r['dp_population']}",
                               "epsilon": r["dp_epsilon"]}) for r in private]
    rows += [((r.round, 0), {"round": f"{r.round} (attempt {r.attempt} not committed: pass 1 released)",
                             "sampled": f"{r.selected} of {r.population}", "epsilon": r.dp_epsilon}) for r in outside]
    rows.sort(key=lambda row: row[0])  # stable: a round's releases in the order recorded, before its commit
    epsilon = max(row["epsilon"] for _, row in rows)  # spent only grows
    delta = private[-1]["dp_delta"] if private else outside[-1].dp_delta
    table = format_table([{**row, "epsilon": f"{row['epsilon']:.4g}"} for _, row in rows],
                         ("round", "sampled", "epsilon"))
    extra = f" and {len(outside)} released first pass(es) of attempts that did not commit" if outside else ""
    return [f"Differential privacy (client level): epsilon {epsilon:.4g} at delta {delta:.3g} "
            f"after {private[-1]['round'] if private else 0} rounds{extra}.", "", table, ""]


def secure_lines(rounds: Sequence[dict[str, Any]]) -> list[str]:
    """Under secure aggregation: per round whether it was secure, its survivors, the dropouts recovered
    from shares, and each extra stage's bytes up and down and seconds (issue 30 item 6)."""
    if not any(r.get("secure_aggregation") for r in rounds):
        return []
    stages = list(dict.fromkeys(s for r in rounds for part in ("bytes_up", "bytes_down", "seconds")
                                for s in r.get("secure", {}).get(part, {})))
    rows = [_secure_row(r, stages) for r in rounds]
    return ["Secure aggregation: the server learned each secure round's sum only. Extra stages per round, "
            "as MB up / MB down (all clients together) / the stage's seconds at the server:", "",
            format_table(rows, ("round", "secure", "survivors", "dropouts recovered", *stages)), ""]


def _secure_row(record: dict[str, Any], stages: Sequence[str]) -> dict[str, Any]:
    secure = record.get("secure")
    if secure is None:
        return {"round": record["round"], "secure": "no"}
    cells = {s: f"{secure.get('bytes_up', {}).get(s, 0) / 1e6:.3g} / {secure.get('bytes_down', {}).get(s, 0) / 1e6:.3g} / "
                f"{secure.get('seconds', {}).get(s, 0.0):.2f}s" for s in stages}
    return {"round": record["round"], "secure": "yes", "survivors": secure.get("survivors"),
            "dropouts recovered": secure.get("dropouts_recovered"), **cells}


def draw(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Three panels per round: losses, megabytes up and down, participants."""
    if not has_matplotlib():
        raise ReportError(MATPLOTLIB_HINT)
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = _rounds(history)
    x = [r["round"] for r in rounds]
    figure, (losses, traffic, people) = plt.subplots(1, 3, figsize=(13, 3.8))
    base = [r for r in history if r.get("round") == 0 and r.get("validation_loss") is not None]
    validation = [(r["round"], r["validation_loss"]) for r in base + rounds if r.get("validation_loss") is not None]
    if validation:
        losses.plot(*zip(*validation), marker="o", label="validation (merged model)")
    train = [(r["round"], r["train_loss"]) for r in rounds if r.get("train_loss") is not None]
    if train:
        losses.plot(*zip(*train), marker="s", label="train (clients' mean)")
    losses.set(title="loss per round", xlabel="round", ylabel="loss")
    losses.legend()
    traffic.bar([v - 0.2 for v in x], [r["bytes_in"] / 1e6 for r in rounds], width=0.4, label="up (updates)")
    traffic.bar([v + 0.2 for v in x], [r["bytes_out"] / 1e6 for r in rounds], width=0.4, label="down (globals)")
    traffic.set(title="traffic per round", xlabel="round", ylabel="MB")
    traffic.legend()
    people.bar(x, [r.get("num_clients", len(r.get("clients", []))) for r in rounds])
    people.set(title="participants per round", xlabel="round", ylabel="clients")
    for axis in (losses, traffic, people):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    people.yaxis.set_major_locator(MaxNLocator(integer=True))  # and so are clients
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(state_dir: Path, out_dir: Path | None = None, require_png: bool = True) -> Report:
    """Write report.png and report.md for a state directory (into it, unless ``out_dir``)."""
    if not any((state_dir / name).is_file() for name in ("history.jsonl", "state.db")):
        raise ReportError(f"{state_dir} is not a flora-server state directory (no history.jsonl, no state.db): "
                          "give the server's --state-dir")
    history = read_history(state_dir / "history.jsonl")
    if not _rounds(history):
        raise ReportError(f"{state_dir / 'history.jsonl'} has no committed round yet: nothing to report")
    try:
        releases = read_releases(Layout(state_dir).dp_releases)
    except ReleaseFileError as err:
        raise ReportError(str(err)) from None
    out_dir = out_dir or state_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    png: Path | None = out_dir / PNG_NAME
    if has_matplotlib():
        draw(history, png)
    elif require_png:
        raise ReportError(MATPLOTLIB_HINT)
    else:
        png = None
    markdown = out_dir / MARKDOWN_NAME
    markdown.write_text(summary_markdown(history, state_dir, png, releases), encoding="utf-8")
    return Report(markdown, png)
