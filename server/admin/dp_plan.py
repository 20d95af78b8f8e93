"""``flora-admin dp-plan``: the privacy budget a client-level DP run would spend, before anything runs.

Pure planning: it reads flags, asks ``flora.common.privacy.accountant`` and prints. Every flag is
parsed here, not by argparse, so a bad value is one line naming the flag (exit 2), like the
other configuration errors.
"""

from __future__ import annotations

import argparse
import math

from flora.common.privacy.accountant import (
    ACCOUNTANTS, MAX_SIGMA, PrivacyError, default_delta, epsilon_after_rounds, sigma_for_epsilon,
)
from flora.common.tables import format_table

RELEASE_PASSES = {"sketch": 2, "dense": 1}
TABLE_ALL_UP_TO = 20  # every round up to this many; beyond, a sample of about this many rows

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dp-plan flags, taken as text and checked by ``plan_from_flags``."""
    parser.add_argument("--clients", metavar="N", help="number of data holders in the run (required)")
    parser.add_argument("--clients-per-round", metavar="K|all", default="all",
                        help="clients sampled per round, without replacement (default: all)")
    parser.add_argument("--rounds", metavar="R", help="number of rounds (required)")
    parser.add_argument("--noise-multiplier", metavar="S", help="sigma: noise std per release over the clip norm C")
    parser.add_argument("--target-epsilon", metavar="E", help="print the noise multiplier that keeps the run within E")
    parser.add_argument("--release", default="sketch", metavar="sketch|dense",
                        help="sketch: two Gaussian releases per round; dense: one (default: sketch)")
    parser.add_argument("--delta", metavar="D", help="delta (default: min(1e-5, 1/(10 N)), below 1/N)")
    parser.add_argument("--accountant", default="rdp", metavar="rdp|pld",
                        help="rdp: sampling without replacement as flora samples (default); "
                             "pld: tighter, but accounts Poisson sampling at q = K/N")


def _int(flag: str, text: str | None, low: int, high: int) -> int:
    if text is None:
        raise PrivacyError(f"{flag} is required")
    try:
        value = int(text)
    except ValueError:
        raise PrivacyError(f"{flag} {text!r} is not a whole number") from None
    if not low <= value <= high:
        raise PrivacyError(f"{flag} {value} is outside {low}..{high}")
    return value


def _float(flag: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PrivacyError(f"{flag} {text!r} is not a number") from None
    if not (math.isfinite(value) and low < value <= high):
        raise PrivacyError(f"{flag} {value} is outside ({low}, {high}]")
    return value


def _rows(rounds: int) -> list[int]:
    if rounds <= TABLE_ALL_UP_TO:
        return list(range(1, rounds + 1))
    return sorted({max(1, round(rounds * i / TABLE_ALL_UP_TO)) for i in range(1, TABLE_ALL_UP_TO + 1)} | {1})


def run(args: argparse.Namespace) -> list[str]:
    """Validate the flags, account, and return the lines to print (raises PrivacyError naming a flag)."""
    clients = _int("--clients", args.clients, 1, 10**9)
    per_round = clients if args.clients_per_round == "all" else _int("--clients-per-round", args.clients_per_round, 1, clients)
    rounds = _int("--rounds", args.rounds, 1, 1_000_000)
    if args.release not in RELEASE_PASSES:
        raise PrivacyError(f"--release {args.release!r} must be sketch or dense")
    if args.accountant not in ACCOUNTANTS:
        raise PrivacyError(f"--accountant {args.accountant!r} must be rdp or pld")
    delta = default_delta(clients) if args.delta is None else _float("--delta", args.delta, 0.0, 1.0 / clients)
    if args.noise_multiplier is None and args.target_epsilon is None:
        raise PrivacyError("give --noise-multiplier or --target-epsilon (or both)")
    sigma = None if args.noise_multiplier is None else _float("--noise-multiplier", args.noise_multiplier, 0.0, MAX_SIGMA)
    target = None if args.target_epsilon is None else _float("--target-epsilon", args.target_epsilon, 0.0, math.inf)
    passes = RELEASE_PASSES[args.release]
    shape = (clients, per_round, rounds, passes, delta, args.accountant)
    lines = [f"plan: {clients} clients, {per_round} per round, {rounds} rounds, {args.release} release "
             f"({passes} Gaussian mechanism{'s' if passes > 1 else ''} per round), delta {delta:.3g}",
             f"accounting: {_accounting(args.accountant, clients, per_round)}"]
    if target is not None:
        needed = sigma_for_epsilon(target, *shape)
        lines.append(f"noise multiplier for target epsilon {target:g}: {needed:.4g}")
        sigma = needed if sigma is None else sigma
    at = _rows(rounds)
    spent = epsilon_after_rounds(sigma, *shape, at_rounds=at)
    lines += [f"epsilon spent with noise multiplier {sigma:.4g}:",
              format_table([{"round": r, "epsilon": e} for r, e in zip(at, spent)], ("round", "epsilon")),
              f"final: epsilon {spent[-1]:.4g} at delta {delta:.3g} after {rounds} rounds"]
    return lines


def _accounting(accountant: str, clients: int, per_round: int) -> str:
    if per_round == clients:
        sampling = "no sampling (every client every round)"
    elif accountant == "rdp":
        sampling = f"{per_round} of {clients} sampled per round without replacement"
    else:
        sampling = f"{per_round} of {clients} per round, accounted as Poisson sampling at q = {per_round / clients:.4g}"
    neighbours = "replace-one neighbours (sensitivity 2C)" if accountant == "rdp" else "add/remove neighbours (sensitivity C)"
    return f"{accountant}, {sampling}; {neighbours}"
