"""The operator's calls: list the clients, remove one, and the details Status adds for a console.

Removing a client is immediate and lasts until the operator re-admits it: its tokens leave the credentials
and its provisioned certificate is refused on every later call (``flora.server.auth``), it is
withdrawn from selection like a client that left, and the removal is stored so that a restarted
server still refuses it, and marked in the client registry (clients.toml), so that later runs
refuse its kit too. Updates it already had accepted stay: a closed round never changes, and the
open round may still close with them.
"""

from __future__ import annotations

import logging
import math
import time

from flora.server.auth import token_digest
from flora.server.coordinator import Coordinator
from flora.server.errors import InvalidArgument, NotFound
from flora.server.registry import RegistryError
from flora.server.secure_round import secure_summary
from flora.server.store import Revocation
from flora.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

RECENT_ROUNDS = 10


def _ms(seconds: float) -> int:
    return int(seconds * 1000) if math.isfinite(seconds) and seconds > 0 else 0


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _removed(coordinator: Coordinator) -> dict[str, Revocation]:
    return {r.name: r for r in coordinator.store.revocations()}


def enrich(coordinator: Coordinator, reply: pb.StatusReply) -> pb.StatusReply:
    """Status plus what an operator needs: attempt, bytes, join and removal times, recent rounds."""
    if reply.HasField("round") and coordinator.machine.current is not None:
        reply.round.attempt = coordinator.machine.current.attempt
    submitted = coordinator.store.submitted_bytes()
    removed = _removed(coordinator)
    for status in reply.clients:
        client = coordinator.clients[status.client_id]
        status.bytes_submitted = submitted.get(client.id, 0)
        status.joined_unix_ms = _ms(client.joined)
        status.device = client.device
        if client.name in removed:
            status.state = "removed"
            status.removed_unix_ms = _ms(removed[client.name].revoked)
    for record in coordinator.store.recent_history(RECENT_ROUNDS):
        if record.get("round", 0) == 0:
            continue
        reply.recent_rounds.append(pb.RoundSummary(
            round=record["round"], num_clients=record.get("num_clients", 0), train_loss=_nan(record.get("train_loss")),
            validation_loss=_nan(record.get("validation_loss")), bytes_in=record.get("bytes_in", 0),
            bytes_out=record.get("bytes_out", 0), committed_unix_ms=_ms(record.get("committed_unix", 0.0)),
            dp_epsilon=record.get("dp_epsilon", 0.0)))
        if record.get("secure"):
            reply.recent_rounds[-1].secure.CopyFrom(secure_summary(record["secure"]))
    return reply


def list_clients(coordinator: Coordinator) -> pb.ListClientsReply:
    """Every joined client (as Status shows it), then provisioned names that never joined."""
    reply = pb.ListClientsReply(clients=enrich(coordinator, coordinator.status()).clients)
    joined = {c.name for c in coordinator.clients.values()}
    removed = _removed(coordinator)
    for name in coordinator.credentials.provisioned_names():
        if name not in joined:
            entry = coordinator.credentials.registry_entry(name)
            when = removed[name].revoked if name in removed else entry.removed_unix if entry.removed is not None else None
            reply.clients.append(pb.ClientStatus(
                client_name=name, state="provisioned" if when is None else "removed", removed_unix_ms=_ms(when or 0.0)))
    return reply


def remove_client(coordinator: Coordinator, request: pb.RemoveClientRequest) -> pb.RemoveClientReply:
    """Revoke a client's token and certificate now; keep its accepted updates."""
    name = request.client_name
    if not name:
        raise InvalidArgument("client_name is required")
    client = next((c for c in coordinator.clients.values() if c.name == name), None)
    entry = coordinator.credentials.registry_entry(name)
    if client is None and entry is None:
        raise NotFound(f"no client named {name[:80]!r} joined this run or is provisioned for it")
    if name in _removed(coordinator):
        return pb.RemoveClientReply(client_id=client.id if client else "", already_removed=True,
                                    message=f"client {name!r} was already removed")
    tokens = {t for t in (client.token_sha256 if client else "", entry.token_sha256 if entry else "") if t}
    cert = entry.cert_sha256 if entry else ""
    reason = "".join(ch if ch.isprintable() else " " for ch in request.reason[:200])  # one line, in logs and clients.toml
    coordinator.store.revoke_client(Revocation(
        name=name, client_id=client.id if client else "", token_sha256=",".join(sorted(tokens)), cert_sha256=cert,
        reason=reason, revoked=time.time()))
    coordinator.credentials.revoke(name, tokens, [cert], reason)
    if client is not None:
        coordinator.withdraw(client.id)
    log.warning("client %s (%s) removed by the operator%s: token%s revoked; its accepted updates stay",
                name, client.id if client else "never joined", f" ({reason})" if reason else "",
                " and certificate" if cert else "")
    registry = _mark_registry(coordinator, name, reason)
    return pb.RemoveClientReply(client_id=client.id if client else "",
                                message=f"client {name!r} removed: its token{' and certificate' if cert else ''} no longer "
                                        f"work{registry}")


def _mark_registry(coordinator: Coordinator, name: str, reason: str | None) -> str:
    """Record a removal (or re-admission) in the client registry, so later runs keep it; what to tell the operator."""
    registry = coordinator.credentials.registry
    if registry is None or registry.get(name) is None:
        return ""
    try:
        registry.mark(name, reason, time.time())
    except (OSError, RegistryError) as err:
        log.error("client %s: the client registry %s could not be updated (%s); later runs will %s", name,
                  registry.path, err, "still refuse it" if reason is None else "admit its kit again")
        return f"; the client registry {registry.path} could not be updated ({err}): edit it by hand"
    return f"; the client registry {registry.path} now says so for later runs too"


def readmit_client(coordinator: Coordinator, request: pb.ReadmitClientRequest) -> pb.ReadmitClientReply:
    """Lift a removal, in this run and in the client registry: the client's kit may join again."""
    name = request.client_name
    if not name:
        raise InvalidArgument("client_name is required")
    entry = coordinator.credentials.registry_entry(name)
    in_run = name in _removed(coordinator)
    if not in_run and (entry is None or entry.removed is None):
        known = entry is not None or any(c.name == name for c in coordinator.clients.values())
        if not known:
            raise NotFound(f"no client named {name[:80]!r} joined this run or is provisioned for it")
        return pb.ReadmitClientReply(readmitted=False, message=f"client {name!r} is not removed")
    coordinator.store.readmit_client(name)
    coordinator.credentials.readmit(name)
    client = next((c for c in coordinator.clients.values() if c.name == name), None)
    if client is not None:
        coordinator.credentials.register(client.id, client.token_sha256)
    registry = _mark_registry(coordinator, name, None)
    log.warning("client %s re-admitted by the operator: it may join again", name)
    return pb.ReadmitClientReply(readmitted=True, message=f"client {name!r} re-admitted: it may join again{registry}")


def load_revocations(coordinator: Coordinator) -> None:
    """At start: refuse every client removed before the restart."""
    for revocation in coordinator.store.revocations():
        tokens = [t for t in revocation.token_sha256.split(",") if t]
        coordinator.credentials.revoke(revocation.name, tokens, [revocation.cert_sha256], revocation.reason)
