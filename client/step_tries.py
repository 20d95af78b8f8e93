"""How often a client tries one secure step before it gives the round up (issue 30).

A secure step stays open at the server until its deadline, and NextTask hands it out again after
every failed answer. A refusal that cannot change on a retry (INVALID_ARGUMENT: a payload over a
limit, a vector the server cannot take; a request this client's protocol refuses) would then be
recomputed and sent again and again until the deadline, and the round's next attempt would do
the same. ``StepTries`` caps that: after ``STEP_TRIES`` failed tries of one step the client gives
the round up with one error line, answers nothing more of it and sits its steps out until their
deadlines. Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) never get here: the connection
retries them with backoff inside the call, as every call's.
"""

from __future__ import annotations

import logging
from collections import defaultdict

log = logging.getLogger(__name__)

STEP_TRIES = 3


class StepTries:
    """Failed tries per (round, step); the rounds given up."""

    def __init__(self, tries: int = STEP_TRIES) -> None:
        self.tries = tries
        self._failed: dict[tuple[int, str], int] = defaultdict(int)
        self._given_up: set[int] = set()

    def gave_up(self, number: int) -> bool:
        """Whether this client gave round ``number`` up."""
        return number in self._given_up

    def failed(self, number: int, step: str, detail: str) -> bool:
        """Count a failed try of ``step``; True (and the round given up, said once) at the cap."""
        self._failed[number, step] += 1
        if self._failed[number, step] < self.tries:
            return False
        self._given_up.add(number)
        log.error("event=secure_round_given_up round=%d step=%s tries=%d detail=%r: the step failed %d times "
                  "and would fail again; this client sits the round out", number, step, self.tries, detail[:300],
                  self.tries)
        return True

    def succeeded(self, number: int, step: str) -> None:
        """A step answered: its count starts over."""
        self._failed.pop((number, step), None)
