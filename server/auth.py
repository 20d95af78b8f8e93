"""Who is calling: bearer tokens, their storage as hashes, and the interceptor that checks them.

Every flora.v1 call carries ``authorization: Bearer <token>`` (protos/PROTOCOL.md). The
interceptor rejects a call without acceptable credentials with UNAUTHENTICATED before any
handler runs; handlers then resolve the caller with ``Credentials.client_for`` on the same
token. Only ``sha256(token)`` is ever stored, and secrets are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import grpc

_SERVICE = "/flora.v1.Coordinator/"
_HEALTH = "/grpc.health.v1.Health/"


def new_token() -> str:
    """A fresh client token: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the server stores for a token: its hex sha256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if there is one."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _same(secret: str | None, presented: str | None) -> bool:
    return secret is not None and presented is not None and hmac.compare_digest(secret.encode(), presented.encode())


class Credentials:
    """The server's view of valid tokens: enrolment, operator, and one per joined client."""

    def __init__(self, enrollment_token: str | None, operator_token: str | None) -> None:
        self._enrollment = enrollment_token
        self._operator = operator_token
        self._clients: dict[str, str] = {}  # sha256(token) -> client id

    @property
    def open_enrollment(self) -> bool:
        """Whether anyone may join without an enrolment token."""
        return self._enrollment is None

    def register(self, client_id: str, digest: str) -> None:
        """Make a client's token (given by its hash) valid."""
        self._clients[digest] = client_id

    def client_for(self, token: str | None) -> str | None:
        """The client a token belongs to, or None."""
        # A dict lookup by hash: timing reveals at most which hashes exist, never the token.
        return self._clients.get(token_digest(token)) if token else None

    def is_enrollment(self, token: str | None) -> bool:
        """Whether ``token`` is the server's enrolment token."""
        return _same(self._enrollment, token)

    def is_operator(self, token: str | None) -> bool:
        """Whether ``token`` is the server's operator token."""
        return _same(self._operator, token)

    def refusal(self, method: str, token: str | None) -> str | None:
        """Why a call to ``method`` with ``token`` must be refused, or None to let it through."""
        if not method.startswith(_SERVICE):
            return None  # health checks are public; unknown methods get UNIMPLEMENTED from gRPC
        call = method[len(_SERVICE):]
        if self.client_for(token) is not None:
            return None
        if call in ("Join", "GetRun"):
            if self.open_enrollment or self.is_enrollment(token) or (call == "GetRun" and self.is_operator(token)):
                return None
            return (f"{call} needs the server's enrolment token (or a returning client's own token) "
                    "as 'authorization: Bearer <token>'")
        if call == "Status" and self.is_operator(token):
            return None
        if token is None:
            return f"{call} needs 'authorization: Bearer <client token>' metadata; call Join first"
        return f"{call}: unknown token; join again to get a valid one"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses unauthenticated calls with UNAUTHENTICATED before their handler runs."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        reason = self._credentials.refusal(method, bearer_token(handler_call_details.invocation_metadata))
        handler = await continuation(handler_call_details)
        if reason is None or handler is None:
            return handler
        return _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts with UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse, **codecs)
