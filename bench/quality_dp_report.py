"""The tables of ``bench.quality_dp``: held-out loss per grid cell over seeds, and the downlink.

Pure functions from the results files' JSON to table rows, so that several invocations (another
seed, the rest of an interrupted grid) print as one grid, and only if they ran the same regime.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from flora.common.tables import format_table

REGIME = ("rounds", "local_steps", "batch_size", "learning_rate", "cutoff", "examples_per_client",
          "validation_fraction", "rank", "clip_norm", "delta", "seed")  # "seed": the data split


def check_regime(reports: Sequence[dict]) -> dict:
    """The settings every report shares; a SystemExit naming the first setting that differs."""
    first = reports[0]["settings"]
    for report in reports[1:]:
        for key in REGIME:
            if report["settings"].get(key) != first.get(key):
                raise SystemExit(f"results differ in {key}: {first.get(key)} and {report['settings'].get(key)}")
    return first


def grid_rows(reports: Sequence[dict]) -> list[dict]:
    """One row per (K, clients per round, method, release, epsilon): sigma, noise std per entry
    (sigma C max_k p_k, the clients' weights equal here), loss mean and per seed."""
    settings = check_regime(reports)
    cells: dict[tuple, list[dict]] = {}
    for run in (run for report in reports for run in report["runs"]):
        key = (run["clients"], run.get("per_round", run["clients"]), run["method"], run["release"], run["epsilon"])
        cells.setdefault(key, []).append(run)
    methods = {m: i for i, m in enumerate(dict.fromkeys(m for report in reports for m in report["settings"]["methods"]))}
    order = sorted(cells, key=lambda c: (c[0], c[1], methods.get(c[2], len(methods)), c[3] != "none", c[3], c[4] or 0))
    rows = []
    for clients, per_round, method, release, epsilon in order:
        runs = sorted(cells[(clients, per_round, method, release, epsilon)], key=lambda r: r["seed"])
        losses = [r["validation_loss"] for r in runs]
        sigma = runs[0]["sigma"]
        rows.append({
            "K": str(clients), "per round": str(per_round), "method": method, "release": release,
            "epsilon": "-" if epsilon is None else f"{epsilon:g}",
            "sigma": "-" if sigma is None else f"{sigma:.3g}",
            "noise std": "-" if sigma is None else f"{sigma * settings['clip_norm'] / per_round:.2e}",
            f"loss after {settings['rounds']}": f"{statistics.fmean(losses):.3f}",
            "per seed": ", ".join(f"{r['seed']}: {r['validation_loss']:.3f}" for r in runs),
            "downlink values": str(runs[0]["downlink_values"]),
        })
    return rows


def downlink_rows(report: dict) -> list[dict]:
    """The downlink comparison as printable rows."""
    names = {"clients": "clients in the round"}  # the release sums the round's clients, however many K there are
    return [{names.get(k, k): (f"{v:,}" if isinstance(v, int) else str(v)) for k, v in row.items()}
            for row in report["downlink_at_scale"]]


def print_results(reports: Sequence[dict]) -> None:
    """Both tables, for one results file or several of the same regime."""
    settings = check_regime(reports)
    rows = downlink_rows(reports[0])
    print("\nDownlink per round and client after a private release (float32; every client gets the same update)")
    print(format_table(rows, list(rows[0])) if rows else "(none)")
    rows = grid_rows(reports)
    seeds = sorted({run["seed"] for report in reports for run in report["runs"]})
    print(f"\nHeld-out loss under client-level DP (delta {settings['delta']:g}, C {settings['clip_norm']:g}, "
          f"{settings['rounds']} rounds, {settings['local_steps']} local steps, cutoff {settings['cutoff']}, "
          f"seeds {', '.join(map(str, seeds))}; noise std per entry = sigma C / clients per round)")
    print(format_table(rows, list(rows[0])) if rows else "(no finished runs)")
