"""Why the server refuses a request, in domain terms.

Domain modules raise these; only ``flora.server.servicer`` knows the gRPC status each one maps
to, so the round logic, the store and the aggregator stay free of gRPC. Messages are written for
the client's logs: they name the field at fault and the value or limit it broke.
"""

from __future__ import annotations


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
    """The request exceeds a size limit."""


class Unavailable(Refusal):
    """The server is shutting down; try again later (possibly elsewhere)."""


class NotFound(Refusal):
    """The named thing (a client, say) does not exist."""
