"""Round settings an operator changes on a running server (``flora-admin settings``).

A run stalls when its rules no longer fit its clients (``min_clients`` 3 after a client was
removed leaves "needs 3 connected clients, has 2" forever), and a restart with other flags would
throw away the round in progress. So the rules of the rounds, and only those, may change live:
each change is validated by the same pydantic model and limits as the configuration, stored in
the run's database (a restart keeps it, over the configured value), logged, and handed to the
round machine, which applies it at once (``RoundMachine.set_policy``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import ValidationError

from flora.server.config import ServerSettings
from flora.server.errors import InvalidArgument
from flora.server.rounds import RoundPolicy
from flora.server.store import Store
from flora.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from flora.server.coordinator import Coordinator

log = logging.getLogger(__name__)

# Safe to change while rounds run: they decide when a round opens and closes, never what a
# client trains or how updates are combined (those define the run: server/startup.py).
LIVE_SETTINGS = ("rounds", "min_clients", "clients_per_round", "quorum", "round_deadline_s")


def round_policy(settings: ServerSettings) -> RoundPolicy:
    """The round machine's rules from the server settings."""
    return RoundPolicy(
        rounds=settings.rounds, min_clients=settings.min_clients, selection=settings.selection, quorum=settings.quorum,
        deadline_s=settings.round_deadline_s, client_timeout_s=settings.client_timeout_s, seed=settings.seed,
        fresh_attempts=settings.dp_enabled,
    )


def live_values(settings: ServerSettings) -> dict[str, str]:
    """The live settings as text, as an operator writes them."""
    return {name: str(getattr(settings, name)) for name in LIVE_SETTINGS}


def changed(settings: ServerSettings, changes: Mapping[str, str]) -> ServerSettings:
    """``settings`` with ``changes`` applied, validated as the configuration is (all or nothing)."""
    unknown = sorted(set(changes) - set(LIVE_SETTINGS))
    if unknown:
        raise InvalidArgument(f"{', '.join(repr(n[:40]) for n in unknown)}: not a setting that may change while the "
                              f"server runs (those are {', '.join(LIVE_SETTINGS)})")
    try:
        return ServerSettings.model_validate({**dict(settings), **changes})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']} (got {e.get('input')!r})"
                             for e in err.errors())
        raise InvalidArgument(problems[:500]) from None


def with_stored(settings: ServerSettings, store: Store) -> ServerSettings:
    """At start: the configured settings with the operator's live changes stored in the run applied."""
    stored = store.live_settings()
    if not stored:
        return settings
    try:
        kept = changed(settings, {name: value for name, value in stored.items() if name in LIVE_SETTINGS})
    except InvalidArgument as err:
        log.warning("the round settings an operator changed (%s) do not fit this configuration (%s): using the "
                    "configured values", ", ".join(f"{n}={v}" for n, v in sorted(stored.items())), err)
        return settings
    differing = [f"{name}={stored[name]} (configured {getattr(settings, name)})" for name in sorted(stored)
                 if name in LIVE_SETTINGS and str(getattr(settings, name)) != stored[name]]
    if differing:
        log.warning("keeping the round settings an operator changed while the run went on: %s "
                    "(flora-admin settings --set NAME=VALUE changes them)", ", ".join(differing))
    return kept


def update_settings(coordinator: Coordinator, request: pb.SettingsRequest) -> pb.SettingsReply:
    """The operator's Settings call: validate, apply to the round machine, store, log."""
    before = coordinator.settings
    if not request.changes:
        return pb.SettingsReply(settings=live_values(before), message="no change requested")
    after = changed(before, dict(request.changes))
    machine = coordinator.machine
    old_policy = machine.policy
    machine.set_policy(round_policy(after))  # refuses a change the run's state forbids, before anything is stored
    try:
        coordinator.store.save_live_settings({n: v for n, v in live_values(after).items() if n in request.changes},
                                             time.time())
    except BaseException:
        machine.policy = old_policy  # not stored: not in force either
        raise
    coordinator.use_settings(after)
    diffs = [f"{name} {getattr(before, name)} -> {getattr(after, name)}" for name in LIVE_SETTINGS
             if getattr(before, name) != getattr(after, name)]
    message = f"round settings changed: {', '.join(diffs)}" if diffs else "no setting changed value"
    log.warning("the operator changed the round settings: %s", ", ".join(diffs) or "nothing")
    coordinator.driver.advance()  # e.g. a lower min_clients opens the waiting round now
    coordinator.driver.notify()
    return pb.SettingsReply(settings=live_values(after), message=message)
