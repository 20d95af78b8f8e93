"""A background heartbeat while the client syncs, trains or uploads.

Between NextTask calls the server has no other sign of life from a busy client, and a client
that trains on a round the server has already closed wastes its time. The heartbeat thread
reports the activity every few seconds and raises ``round_closed`` when the server says the
round moved on, which the trainer's ``should_stop`` turns into a prompt cancellation.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import grpc

from flora.client.connection import Connection, Stopped, rpc_code, rpc_details
from flora.v1 import coordinator_pb2

log = logging.getLogger(__name__)


class Heartbeat:
    """Context manager running the heartbeat thread for one round's work."""

    def __init__(self, conn: Connection, round_number: int, interval: float) -> None:
        self._conn, self._round, self._interval = conn, round_number, interval
        self.activity = coordinator_pb2.CLIENT_ACTIVITY_SYNCING
        self.progress = 0.0
        self.round_closed = threading.Event()
        self._failures = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flora-heartbeat-r{round_number}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._done.set()
        self._thread.join()

    def beat(self) -> None:
        """Send one heartbeat; failures are only logged (the main loop owns reconnecting)."""
        request = coordinator_pb2.HeartbeatRequest(activity=self.activity, round=self._round, progress=self.progress)
        try:
            reply = self._conn.unary("Heartbeat", request, timeout=min(self._conn.settings.rpc_timeout, 2 * self._interval))
        except grpc.RpcError as exc:
            if rpc_code(exc) == grpc.StatusCode.UNAUTHENTICATED and not self.round_closed.is_set():
                # Removed by the operator (or forgotten by a new run): stop training; the main
                # loop's next call says which, and rejoins or exits.
                log.warning("event=round_closed round=%d reason=unauthenticated detail=%r", self._round, rpc_details(exc)[:200])
                self.round_closed.set()
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG  # once per outage, not per beat
            log.log(level, "event=heartbeat_failed round=%d code=%s detail=%r", self._round,
                    getattr(rpc_code(exc), "name", "?"), rpc_details(exc)[:200])
            return
        except Stopped:
            return
        if self._failures:
            log.info("event=heartbeat_recovered round=%d failed_beats=%d", self._round, self._failures)
            self._failures = 0
        if reply.round_closed and not self.round_closed.is_set():
            log.info("event=round_closed round=%d open_round=%d version=%d", self._round, reply.open_round, reply.global_version)
            self.round_closed.set()

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            self.beat()
