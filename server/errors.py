"""Why the server refuses a request, in domain terms.

Domain modules raise these; only ``flora.server.servicer`` knows the gRPC status each one maps
to, so the round logic, the store and the aggregator stay free of gRPC. Messages are written for
the client's logs: they name the field at fault and the value or limit it broke.
"""

from __future__ import annotations

import errno
import sqlite3

from flora.common.oserrors import chain, os_errno

# errno values that mean the disk (or a quota on it) is full, and that the process or the system
# is out of file descriptors: both pass once an operator (or time) frees some.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_FILES = frozenset({errno.EMFILE, errno.ENFILE})


class Refusal(Exception):
    """A request the server declines; the subclass says which kind of refusal it is."""


class InvalidArgument(Refusal):
    """The request itself is malformed or breaks a limit independent of the run's state."""


class Unauthenticated(Refusal):
    """No valid credentials for the call."""


class AlreadyExists(Refusal):
    """The name or the round's update is already taken by something else."""


class FailedPrecondition(Refusal):
    """Well formed, but the run is not in a state where the request can be honoured."""


class OutOfRange(Refusal):
    """A version or offset beyond what exists."""


class DataLoss(Refusal):
    """The bytes that arrived are not the bytes announced (truncated, reordered, bad hash)."""


class ResourceExhausted(Refusal):
    """The request exceeds a size limit, or the server's disk is full (retry later)."""


class Unavailable(Refusal):
    """The server is shutting down or out of file descriptors; try again later (possibly elsewhere)."""


class NotFound(Refusal):
    """The named thing (a client, say) does not exist."""


class Internal(Refusal):
    """A server fault the client cannot fix; details stay in the server's log, never in the reply."""


_NOT_RECORDED = "nothing of this request was recorded: retry later"
# After the record was written and only its fsync failed: the row stays (an update's retry is then
# acknowledged as a duplicate, never counted twice), so "nothing was recorded" would be untrue.
_NOT_DURABLE = "the request was recorded but not yet made durable: send it again (a kept copy is acknowledged once)"


def resource_refusal(error: BaseException, *, recorded: bool = False) -> Refusal | None:
    """The refusal for a server that ran out of disk space or file descriptors, else None.

    One place decides what a full disk (ENOSPC/EDQUOT, SQLite's "database or disk is full") and
    fd exhaustion (EMFILE/ENFILE, SQLite's "unable to open database file") look like to a client:
    a status it retries with backoff and a message that says what ran out. The error is
    recognised by what it is wherever it was raised (``flora.common.oserrors``): safetensors and
    torch report an OS error as text, and a wrapper carries it as its cause. ``recorded``: the
    failure came after the request's record was written (its fsync), and the message says so.
    """
    outcome = _NOT_DURABLE if recorded else _NOT_RECORDED
    code = os_errno(error)
    if code in _DISK_FULL:
        return ResourceExhausted(f"the server's disk is full; {outcome}")
    if code in _NO_FILES:
        return Unavailable(f"the server has run out of file descriptors; {outcome}")
    for link in chain(error):
        if isinstance(link, sqlite3.OperationalError):
            text = str(link).lower()
            if "full" in text:
                return ResourceExhausted(f"the server's database disk is full; {outcome}")
            if "unable to open" in text or "locked" in text or "disk i/o" in text:
                return Unavailable("the server's database is unavailable (its log has the cause); retry later")
    return None


def is_resource_failure(error: BaseException) -> bool:
    """Whether a failure is the server running out of a resource (and so worth retrying later)."""
    return resource_refusal(error) is not None
