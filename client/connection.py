"""The client's side of the wire: channel, bearer token, deadlines, retries, cancellation.

The client uses gRPC's synchronous API, not ``grpc.aio``: training is long, blocking torch work
that belongs on the main thread, and the only concurrency the daemon needs is one heartbeat
thread beside it, which a synchronous channel (thread-safe) serves directly. Every call is made
through a future or a rendezvous so that it stays cancellable: when the stop event is set (by
SIGTERM), a watcher thread cancels whatever is in flight and the blocked caller sees ``Stopped``
at once instead of sitting out a 30-second long-poll.

Retry policy (protos/PROTOCOL.md): UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (the
server's disk is full; size limits are checked before sending, so a well-formed client never
meets that refusal, and a message over gRPC's size limit is not retried: ``never_fits``) are
retried with exponential backoff and full jitter, each retry logged;
UNAUTHENTICATED calls the re-join hook once and retries; every other status is the caller's to
handle. A connection that never came up is diagnosed (flora.client.diagnosis): a server that is
down is waited for forever, a configuration mistake (unknown host, a TLS handshake the two sides
cannot agree on) is named on each retry and ends the client after ``give_up_after`` tries.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from flora.client.config import ClientSettings
from flora.client.diagnosis import ConnectionCheck
from flora.common.wire import SUBMIT_UPDATE
from flora.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Chunks are 1 MiB by default; the cap only bounds what a misbehaving server can make us buffer.
MAX_MESSAGE_BYTES = 64 << 20
_WATCH_INTERVAL_S = 0.5


class Stopped(Exception):
    """The daemon was asked to stop while a call or a backoff was in progress."""


def rpc_code(error: BaseException) -> grpc.StatusCode | None:
    """The status code of a failed call, or None for anything that is not a gRPC error."""
    return error.code() if isinstance(error, grpc.RpcError) and hasattr(error, "code") else None


def rpc_details(error: BaseException) -> str:
    """The server's message of a failed call (empty when there is none)."""
    return (error.details() or "") if isinstance(error, grpc.RpcError) and hasattr(error, "details") else str(error)


def never_fits(error: BaseException) -> bool:
    """A message over gRPC's size limit (RESOURCE_EXHAUSTED "... larger than max ..."): unlike a
    full disk's RESOURCE_EXHAUSTED, sending it again can never succeed, so it is not retried."""
    return rpc_code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in rpc_details(error)


class Backoff:
    """Exponential backoff with full jitter: delay n is uniform in [0, min(cap, base * 2**n)].

    Full jitter spreads the reconnects of many clients after a server restart instead of having
    them arrive in synchronised waves.
    """

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial, self.cap = initial, cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next retry; each call doubles the ceiling up to the cap."""
        ceiling = min(self.cap, self.initial * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Start from the initial delay again (after a success)."""
        self.attempt = 0


def make_channel(settings: ClientSettings) -> grpc.Channel:
    """A channel to the server: TLS (optionally mutual) unless plaintext is allowed (see config)."""
    reconnect_ms = int(settings.backoff_max * 1000)
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 0),  # retries are ours, with the policy above
        # gRPC's own reconnect backoff defaults to 120 s; keep it within ours so that a restarted
        # server is noticed by the next retry, not minutes later.
        ("grpc.initial_reconnect_backoff_ms", int(settings.backoff_initial * 1000) or 1),
        ("grpc.min_reconnect_backoff_ms", int(settings.backoff_initial * 1000) or 1),
        ("grpc.max_reconnect_backoff_ms", reconnect_ms),
    ]
    if not settings.uses_tls:
        return grpc.insecure_channel(settings.server, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca.read_bytes() if settings.tls_ca else None,
        private_key=settings.tls_key.read_bytes() if settings.tls_key else None,
        certificate_chain=settings.tls_cert.read_bytes() if settings.tls_cert else None,
    )
    return grpc.secure_channel(settings.server, credentials, options=options)


class Connection:
    """Authenticated, deadline-bound, retrying, cancellable calls to the Coordinator service."""

    def __init__(self, settings: ClientSettings, stop: threading.Event, channel: grpc.Channel | None = None) -> None:
        self.settings = settings
        self.token: str | None = None
        self.on_unauthenticated: Callable[[], None] | None = None
        self._stop = stop
        self._channel = channel or make_channel(settings)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        # SubmitUpdate without a serializer: its messages come serialised, one copy per piece fewer.
        self._submit_encoded = self._channel.stream_unary(
            SUBMIT_UPDATE, request_serializer=None, response_deserializer=coordinator_pb2.SubmitReply.FromString
        )
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self._check = ConnectionCheck(settings)
        self._inflight: set[grpc.Future] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._cancel_on_stop, name="flora-cancel", daemon=True).start()

    def close(self) -> None:
        """Close the channel (in-flight calls fail) and end the cancel watcher."""
        self._closed.set()
        self._channel.close()

    @property
    def stopping(self) -> bool:
        """True once the daemon has been asked to stop."""
        return self._stop.is_set()

    # --- single attempts ---------------------------------------------------------------------

    def unary(self, method: str, request: Any, timeout: float | None = None, token: str | None = None) -> Any:
        """One attempt of a unary call with a deadline; raises grpc.RpcError or Stopped."""
        future = getattr(self._stub, method).future(
            request, timeout=timeout or self.settings.rpc_timeout, metadata=self._metadata(token)
        )
        return self._wait(future)

    def upload(self, messages: Iterator[bytes]) -> coordinator_pb2.SubmitReply:
        """One attempt of SubmitUpdate from messages already serialised (``encoded_update_messages``),
        bounded by the transfer deadline."""
        future = self._submit_encoded.future(messages, timeout=self.settings.transfer_timeout, metadata=self._metadata())
        return self._wait(future)

    def stream_in(self, method: str, messages: Iterator[Any]) -> Any:
        """One attempt of a client-streaming call (secure aggregation's SubmitMasked), bounded by the
        transfer deadline."""
        future = getattr(self._stub, method).future(messages, timeout=self.settings.transfer_timeout, metadata=self._metadata())
        return self._wait(future)

    def stream_out(self, method: str, request: Any) -> Iterator[Any]:
        """One attempt of a server-streaming call (a download); the stream is cancellable."""
        call = getattr(self._stub, method)(request, timeout=self.settings.transfer_timeout, metadata=self._metadata())
        self._track(call)
        try:
            yield from call
        except grpc.RpcError as exc:
            if self.stopping and rpc_code(exc) == grpc.StatusCode.CANCELLED:
                raise Stopped() from None
            raise
        finally:
            call.cancel()  # a no-op once the stream has ended; stops it when the reader gave up early
            self._untrack(call)

    def best_effort(self, method: str, request: Any, timeout: float) -> Any | None:
        """One short, untracked attempt that ignores failure: for Leave while shutting down."""
        try:
            return getattr(self._stub, method)(request, timeout=timeout, metadata=self._metadata())
        except grpc.RpcError as exc:
            log.debug("event=best_effort_failed call=%s code=%s", method, rpc_code(exc))
            return None

    # --- retry policy ---------------------------------------------------------------------------

    def retrying(self, what: str, attempt: Callable[[], T], rejoin: bool = True) -> T:
        """Run ``attempt`` until it succeeds, retrying transient failures with backoff.

        UNAUTHENTICATED (the server forgot or never knew our token, e.g. a new run) calls the
        re-join hook once, then tries again (not for Join itself: ``rejoin=False``); any other
        error propagates to the caller.
        """
        rejoined = False
        while True:
            if self.stopping:
                raise Stopped()
            try:
                result = attempt()
            except grpc.RpcError as exc:
                code = rpc_code(exc)
                if code == grpc.StatusCode.UNAUTHENTICATED and rejoin and self.on_unauthenticated and not rejoined:
                    log.warning("event=unauthenticated call=%s detail=%r action=rejoin", what, rpc_details(exc))
                    self.on_unauthenticated()
                    rejoined = True
                    continue
                if code not in TRANSIENT or never_fits(exc):
                    raise
                self._check.failed(rpc_details(exc))
                self.pause(what, exc)
                continue
            self._backoff.reset()
            self._check.succeeded()
            return result

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """A unary call under the retry policy."""
        return self.retrying(method, lambda: self.unary(method, request, timeout))

    def pause(self, what: str, error: BaseException) -> None:
        """Sleep the next backoff delay after a transient failure (interrupted by stop)."""
        delay = self._backoff.next_delay()
        log.warning(
            "event=retry call=%s code=%s detail=%r attempt=%d delay_s=%.2f",
            what, getattr(rpc_code(error), "name", type(error).__name__), rpc_details(error)[:200],
            self._backoff.attempt, delay,
        )
        if self._stop.wait(delay):
            raise Stopped()

    # --- plumbing -------------------------------------------------------------------------------

    def _metadata(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        token = token or self.token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def _wait(self, future: grpc.Future) -> Any:
        self._track(future)
        try:
            return future.result()
        except grpc.FutureCancelledError:
            raise Stopped() from None
        finally:
            self._untrack(future)

    def _track(self, call: grpc.Future) -> None:
        with self._lock:
            self._inflight.add(call)
        if self.stopping:
            call.cancel()

    def _untrack(self, call: grpc.Future) -> None:
        with self._lock:
            self._inflight.discard(call)

    def _cancel_on_stop(self) -> None:
        """Cancel every in-flight call once stop is requested (off the signal handler's thread)."""
        while not self._stop.wait(_WATCH_INTERVAL_S):
            if self._closed.is_set():
                return
        with self._lock:
            calls = list(self._inflight)
        for call in calls:
            call.cancel()
