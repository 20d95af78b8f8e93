"""The quality benchmark's verdicts: a summary row per run and paired comparisons over seeds.

Seeds are shared by methods (client k gets the same data order and LoRA seed in round t under
every method), so differences are compared per seed: the mean and standard deviation of the
paired difference, and in how many seeds one method is lower. A margin means something only
when it is larger than that spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from flora.common.methods import METHODS
from flora.sim.output import Runs, round_spreads


def _losses_at(records, number: int) -> dict[int, float]:
    """{seed: validation loss after round ``number``}."""
    return {r.seed: r.validation_loss for r in records if r.round == number and r.validation_loss is not None}


def _setting(label: str) -> str:
    return label.rsplit("-", 1)[1]


def _method(label: str) -> str:
    return label.rsplit("-", 1)[0]


def _variant(label: str) -> bool:
    """Whether the run is a method's variant: a compressed downlink (``@``) or quantized bases (``:``)."""
    return "@" in label or ":" in label


def _paired(mine: Mapping[int, float], theirs: Mapping[int, float]) -> dict[str, str] | None:
    """mine - theirs over their common seeds (positive: mine is worse); None without common seeds."""
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    diffs = [mine[s] - theirs[s] for s in seeds]
    return {"mean diff": f"{statistics.fmean(diffs):+.4f}",
            "std diff": f"{statistics.stdev(diffs):.4f}" if len(diffs) > 1 else "-",
            "higher in": f"{sum(d > 0 for d in diffs)}/{len(diffs)} seeds"}


def summary_rows(plan: Sequence[Any], runs: Runs, mmlu: Mapping[str, list[float]], checkpoints: Sequence[int]) -> list[dict[str, Any]]:
    """One row per run: setting, method, exactness, loss after each checkpoint round, MMLU accuracy."""
    rows = []
    for experiment in plan:
        spreads = round_spreads(runs[experiment.label], "validation_loss")
        method = METHODS.get(experiment.method)
        exact = "-" if method is None else ("yes" if method.exact else "no")
        row = {"setting": _setting(experiment.label), "method": _method(experiment.label),
               "exact": "carried" if "@" in experiment.label and exact == "yes" else exact}
        for number in sorted(set(checkpoints)):
            row[f"loss @{number}"] = str(spreads[number]) if number in spreads else "-"
        accs = mmlu.get(experiment.label) or []
        row["MMLU acc"] = f"{statistics.fmean(accs):.3f}" if accs else "-"
        rows.append(row)
    return rows


def comparisons(runs: Runs, checkpoints: Sequence[int]) -> list[dict[str, Any]]:
    """Per setting and checkpoint round: the exact method of lowest mean loss against every other run."""
    rows = []
    for setting in sorted({_setting(label) for label in runs}):
        # compressed downlinks and quantized bases: downlink_comparisons, base_comparisons
        labels = [label for label in runs if _setting(label) == setting and not _variant(label)]
        for number in sorted(set(checkpoints)):
            losses = {label: _losses_at(runs[label], number) for label in labels}
            losses = {label: v for label, v in losses.items() if v}
            exact = [label for label in losses if _method(label) in METHODS and METHODS[_method(label)].exact]
            if not exact:
                continue
            best = min(exact, key=lambda label: statistics.fmean(losses[label].values()))
            for other in losses:
                seeds = sorted(set(losses[best]) & set(losses[other]))
                if other == best or not seeds:
                    continue
                diffs = [losses[best][s] - losses[other][s] for s in seeds]
                rows.append({
                    "setting": setting, "round": number, "best exact": _method(best), "vs": _method(other),
                    "mean diff": f"{statistics.fmean(diffs):+.4f}",
                    "std diff": f"{statistics.stdev(diffs):.4f}" if len(diffs) > 1 else "-",
                    "lower in": f"{sum(d < 0 for d in diffs)}/{len(diffs)} seeds",
                })
    return rows


def downlink_comparisons(runs: Runs, checkpoints: Sequence[int]) -> list[dict[str, Any]]:
    """Each compressed-downlink run (``method@policy-setting``) against its exact run, seed by seed.

    The loss difference (compressed - exact; positive: compression cost quality), the retained
    energy of the rounds' downlinks and the values sent as a share of the dense deltas', over
    the rounds up to the checkpoint.
    """
    rows = []
    for label in sorted((label for label in runs if "@" in label), key=lambda label: (_setting(label), label)):
        exact = f"{_method(label).partition('@')[0]}-{_setting(label)}"
        if exact not in runs:
            continue
        for number in sorted(set(checkpoints)):
            paired = _paired(_losses_at(runs[label], number), _losses_at(runs[exact], number))
            if paired is None:
                continue
            sent = [r.downlink for r in runs[label] if r.downlink is not None and 0 < r.round <= number]
            rows.append({
                "setting": _setting(label), "round": number, "run": _method(label), "vs": _method(exact), **paired,
                "retained energy": f"{statistics.fmean(d['retained_energy'] for d in sent):.4f}" if sent else "-",
                "sent / dense": f"{sum(d['values'] for d in sent) / sum(d['dense_values'] for d in sent):.3f}" if sent else "-",
                "rank max": max((d["rank_max"] for d in sent if d["rank_max"] is not None), default="-"),
            })
    return rows


def base_comparisons(runs: Runs, checkpoints: Sequence[int]) -> list[dict[str, Any]]:
    """Each run on quantized client bases (``method:bases-setting``) against the full-precision run, seed by seed.

    Beside the paired difference (quantized - full precision; positive: the 4-bit or 8-bit bases
    cost quality): the full-precision run's own spread over seeds (sample std) and whether the
    quantized run's mean lies within one such spread of it, the benchmark's verdict.
    """
    rows = []
    for label in sorted((label for label in runs if ":" in label), key=lambda label: (_setting(label), label)):
        full = f"{_method(label).partition(':')[0]}-{_setting(label)}"
        if full not in runs:
            continue
        for number in sorted(set(checkpoints)):
            mine, theirs = _losses_at(runs[label], number), _losses_at(runs[full], number)
            paired = _paired(mine, theirs)
            if paired is None:
                continue
            spread = statistics.stdev(theirs.values()) if len(theirs) > 1 else None
            gap = statistics.fmean(mine.values()) - statistics.fmean(theirs.values())
            rows.append({
                "setting": _setting(label), "round": number, "run": _method(label), "vs": _method(full),
                "loss": str(round_spreads(runs[label], "validation_loss")[number]),
                "vs loss": str(round_spreads(runs[full], "validation_loss")[number]), **paired,
                "seed spread": "-" if spread is None else f"{spread:.4f}",
                "within spread": "-" if spread is None else ("yes" if abs(gap) <= spread else "no"),
            })
    return rows
