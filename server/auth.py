"""Who is calling: bearer tokens, their storage as hashes, and the interceptor that checks them.

Every flora.v1 call carries ``authorization: Bearer <token>`` (protos/PROTOCOL.md). The
interceptor rejects a call without acceptable credentials with UNAUTHENTICATED before any
handler runs; handlers then resolve the caller with ``Credentials.client_for`` on the same
token. Only ``sha256(token)`` is ever stored, and secrets are compared in constant time.

Provisioned projects (``flora.server.registry``) give each client its own token up front; a
client the operator removed loses its token and its certificate at once: the certificate is
checked on every call (not only at the TLS handshake, which a live connection has long passed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from flora.server.errors import Unauthenticated
from flora.server.registry import Provisioned, Registry, cert_sha256

_SERVICE = "/flora.v1.Coordinator/"
_HEALTH = "/grpc.health.v1.Health/"
OPERATOR_CALLS = frozenset({"ListClients", "RemoveClient", "ReadmitClient", "Settings"})


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


def removed_message(name: str, reason: str) -> str:
    """What a removed client is told, with the operator's reason."""
    return f"client {name!r} was removed by the operator: {reason or 'no reason given'}"


def _same(secret: str | None, presented: str | None) -> bool:
    return secret is not None and presented is not None and hmac.compare_digest(secret.encode(), presented.encode())


class Credentials:
    """The server's view of valid tokens: enrolment, operator, provisioned, one per joined client."""

    def __init__(self, enrollment_token: str | None, operator_token: str | None, registry: Registry | None = None) -> None:
        self._enrollment = enrollment_token
        self._operator = operator_token
        self._registry = registry
        self._clients: dict[str, str] = {}  # sha256(token) -> client id
        self._revoked_tokens: dict[str, str] = {}  # sha256(token) -> name
        self._revoked_certs: dict[str, str] = {}  # sha256(certificate) -> name
        self.revoked_names: dict[str, str] = {}  # name -> the operator's reason

    @property
    def open_enrollment(self) -> bool:
        """Whether anyone may join without an enrolment token (no token and no client registry)."""
        return self._enrollment is None and self._registry is None

    def register(self, client_id: str, digest: str) -> None:
        """Make a client's token (given by its hash) valid, unless it was revoked."""
        if digest not in self._revoked_tokens:
            self._clients[digest] = client_id

    def revoke(self, name: str, token_digests: Iterable[str], cert_digests: Iterable[str], reason: str = "") -> None:
        """Refuse a client's name, tokens and certificates from now on."""
        self.revoked_names[name] = reason
        for digest in token_digests:
            self._revoked_tokens[digest] = name
            self._clients.pop(digest, None)
        self._revoked_certs.update((d, name) for d in cert_digests if d)

    def readmit(self, name: str) -> None:
        """Lift a removal: the name, its tokens and certificates are no longer refused (tokens of
        joined clients become valid again once ``register``ed)."""
        self.revoked_names.pop(name, None)
        for revoked in (self._revoked_tokens, self._revoked_certs):
            for digest in [d for d, owner in revoked.items() if owner == name]:
                del revoked[digest]

    def removal(self, token: str | None) -> str | None:
        """Why a removed client's token is refused ("... removed by the operator: <reason>"), or None.

        Its token is revoked in this run, or it is a provisioned token whose registry entry is
        marked removed (by an earlier run).
        """
        if not token:
            return None
        digest = token_digest(token)
        if (name := self._revoked_tokens.get(digest)) is not None:
            return removed_message(name, self.revoked_names.get(name, ""))
        if self._registry is not None:
            self._registry.refresh()
            entry = self._registry.by_token(digest)
            if entry is not None and entry.removed is not None:
                return removed_message(entry.name, entry.removed)
        return None

    def client_for(self, token: str | None) -> str | None:
        """The client a token belongs to, or None."""
        # A dict lookup by hash: timing reveals at most which hashes exist, never the token.
        return self._clients.get(token_digest(token)) if token else None

    def provisioned(self, token: str | None) -> Provisioned | None:
        """The registry entry whose token this is (re-reading a changed registry), unless revoked."""
        if self._registry is None or not token:
            return None
        self._registry.refresh()
        entry = self._registry.by_token(token_digest(token))
        return None if entry is None or entry.name in self.revoked_names or entry.removed is not None else entry

    @property
    def registry(self) -> Registry | None:
        """The client registry, when the server has one."""
        return self._registry

    def provisioned_names(self) -> list[str]:
        """Every client name of the registry (empty without one)."""
        return self._registry.names() if self._registry is not None else []

    def registry_entry(self, name: str) -> Provisioned | None:
        """The registry's entry of a client name, if any."""
        return self._registry.get(name) if self._registry is not None else None

    def issue_token(self, name: str, presented: str | None) -> str:
        """The token a newly joining client gets: its provisioned one, else a fresh one."""
        if name in self.revoked_names:
            raise Unauthenticated(removed_message(name, self.revoked_names[name]))
        listed = self.registry_entry(name)
        if listed is not None and listed.removed is not None:
            raise Unauthenticated(removed_message(name, listed.removed))
        entry = self.provisioned(presented)
        if entry is not None:
            if entry.name != name:
                raise Unauthenticated(f"the token presented was provisioned for client {entry.name!r}, not {name!r}")
            return presented
        if self._registry is not None and not self.is_enrollment(presented):
            raise Unauthenticated(f"client {name!r} is not provisioned: ask the operator for a startup kit")
        return new_token()

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
        if call in OPERATOR_CALLS:
            return None if self.is_operator(token) else f"{call} needs the server's operator token"
        if self.client_for(token) is not None:
            return None
        if (removed := self.removal(token)) is not None:
            return f"{call}: {removed}"
        if call in ("Join", "GetRun"):
            if (self.open_enrollment or self.is_enrollment(token) or self.provisioned(token) is not None
                    or (call == "GetRun" and self.is_operator(token))):
                return None
            return (f"{call} needs the server's enrolment token, a provisioned client token (or a returning "
                    "client's own token) as 'authorization: Bearer <token>'")
        if call == "Status" and self.is_operator(token):
            return None
        if call == "Status":  # an operator's call as often as a client's: name both tokens, not "join"
            return ("Status needs the server's operator token (operator.toml of the operator kit, or --operator-token "
                    "of flora-server) or a joined client's own token; this one is neither")
        if token is None:
            return f"{call} needs 'authorization: Bearer <client token>' metadata; call Join first"
        return f"{call}: unknown or revoked token; join again to get a valid one"

    def certificate_refusal(self, cert_pem: bytes | str | None) -> str | None:
        """Why a call over a connection presenting this client certificate must be refused, or None."""
        if not self._revoked_certs or not cert_pem:
            return None
        if (name := self._revoked_certs.get(cert_sha256(cert_pem))) is not None:
            return f"this client certificate was revoked: {removed_message(name, self.revoked_names.get(name, ''))}"
        return None

    @property
    def checks_certificates(self) -> bool:
        """Whether any certificate is revoked (only then is the peer certificate read per call)."""
        return bool(self._revoked_certs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses unauthenticated calls with UNAUTHENTICATED before their handler runs."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        reason = self._credentials.refusal(method, bearer_token(handler_call_details.invocation_metadata))
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if reason is not None:
            return _refusing(handler, reason)
        if self._credentials.checks_certificates and method.startswith(_SERVICE):
            return _checking_certificate(handler, self._credentials)
        return handler


def _peer_certificate(context: grpc.aio.ServicerContext) -> bytes | None:
    values = context.auth_context().get("x509_pem_cert") or []
    return values[0] if values else None


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts with UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    return _same_shape(handler, refuse, refuse)


def _checking_certificate(handler: grpc.RpcMethodHandler, credentials: Credentials) -> grpc.RpcMethodHandler:
    """``handler``, preceded by a check that the peer's client certificate is not revoked."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        reason = credentials.certificate_refusal(_peer_certificate(context))
        if reason is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        return await behaviour(request, context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        reason = credentials.certificate_refusal(_peer_certificate(context))
        if reason is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        async for item in behaviour(request, context):
            yield item

    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    return _same_shape(handler, call, stream)


def _same_shape(handler: grpc.RpcMethodHandler, unary_reply: Callable, stream_reply: Callable) -> grpc.RpcMethodHandler:
    """A handler with ``handler``'s codecs and call shape around a new behaviour."""
    codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_reply, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_reply, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_reply, **codecs)
    return grpc.stream_stream_rpc_method_handler(stream_reply, **codecs)
