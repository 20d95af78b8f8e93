"""Prometheus metrics of a running server (``--metrics-port``), every name prefixed ``flora_``.

Two sources, so that the domain code knows nothing of Prometheus: an interceptor counts
uploads by outcome (accepted, duplicate, or the refusing status code), and a refresh task on
the event loop reads the run's own state once a second (versions, the history's bytes and
timings, connected clients) into the metrics. The HTTP endpoint runs in prometheus-client's
own thread and only ever reads the registry, never server state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from flora.common.wire import SUBMIT_UPDATE
from flora.server.coordinator import Coordinator

log = logging.getLogger(__name__)

REFRESH_S = 1.0
_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, math.inf)
_WORK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, math.inf)


class Metrics:
    """The server's metrics in their own registry (several servers in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("flora_rounds_committed", "rounds aggregated and committed", registry=r)
        self.version = Gauge("flora_global_version", "latest committed global version", registry=r)
        self.round_seconds = Histogram("flora_round_duration_seconds", "wall time of a round, commit to commit",
                                       buckets=_DURATION_BUCKETS, registry=r)
        self.aggregation_seconds = Histogram("flora_aggregation_seconds", "time to aggregate a round's updates",
                                             buckets=_WORK_BUCKETS, registry=r)
        self.merge_seconds = Histogram("flora_merge_seconds", "time to merge a round's aggregate into the model",
                                       buckets=_WORK_BUCKETS, registry=r)
        self.uploads = Counter("flora_uploads", "SubmitUpdate calls by outcome: accepted, duplicate or the status code",
                               ["outcome"], registry=r)
        self.bytes_in = Counter("flora_bytes_in", "bytes of accepted client updates", registry=r)
        self.bytes_out = Counter("flora_bytes_out", "bytes of global artifacts streamed to clients", registry=r)
        self.connected = Gauge("flora_connected_clients", "clients heard from within client_timeout_s", registry=r)
        self.validation_loss = Gauge("flora_validation_loss", "the server's validation loss of the latest version", registry=r)
        self.validation_loss.set(math.nan)
        # Under differential privacy only (README, "Differential privacy"): the run's budget.
        self.dp_epsilon = Gauge("flora_dp_epsilon", "epsilon spent so far: the committed rounds and any noisy pass "
                                "released outside one (client-level DP)", registry=r)
        self.dp_delta = Gauge("flora_dp_delta", "delta of the run's stated (epsilon, delta)", registry=r)
        self.dp_target = Gauge("flora_dp_target_epsilon", "no round opens past this epsilon (0: no target)", registry=r)
        self.secure_rounds = Counter("flora_secure_rounds", "rounds committed under secure aggregation", registry=r)
        self.secure_recovered = Counter("flora_secure_dropouts_recovered",
                                        "clients recovered from the others' shares after dropping", registry=r)
        self.secure_bytes = Counter("flora_secure_bytes", "bytes of the secure-aggregation steps by direction",
                                    ["direction"], registry=r)
        self.secure_seconds = Histogram("flora_secure_stage_seconds", "seconds of one secure-aggregation step",
                                        ["step"], buckets=_WORK_BUCKETS, registry=r)
        self._seen_version = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._last_commit: float | None = None
        self._history_out = 0

    def refresh(self, coordinator: Coordinator) -> None:
        """Bring the metrics up to date with the run (call on the event loop)."""
        self.connected.set(len(coordinator.machine.connected(time.time())))
        version = coordinator.machine.version
        self.version.set(version)
        if self._last_commit is None:  # first refresh: everything committed before this process
            self._last_commit = coordinator.run.created
            self._read_history(coordinator, after=-1)
        elif version > self._seen_version:
            self._read_history(coordinator, after=self._seen_version)
        self._seen_version = version
        if (privacy := coordinator.driver.privacy) is not None:
            self.dp_epsilon.set(privacy.spent)
            self.dp_delta.set(privacy.delta)
            self.dp_target.set(privacy.target or 0.0)
        bytes_in = sum(coordinator.store.submitted_bytes().values())
        self.bytes_in.inc(max(0, bytes_in - self._bytes_in))
        self._bytes_in = max(self._bytes_in, bytes_in)
        bytes_out = self._history_out + coordinator.driver.bytes_out
        self.bytes_out.inc(max(0, bytes_out - self._bytes_out))
        self._bytes_out = max(self._bytes_out, bytes_out)

    def _read_history(self, coordinator: Coordinator, after: int) -> None:
        for record in coordinator.store.history():
            if record.get("round", 0) > after:
                self._observe(record)

    def _observe(self, record: dict[str, Any]) -> None:
        number, committed = record.get("round", 0), record.get("committed_unix")
        if number > 0:
            self.rounds.inc()
            seconds = record.get("seconds", {})
            if "aggregate" in seconds:
                self.aggregation_seconds.observe(seconds["aggregate"])
            if "merge" in seconds:
                self.merge_seconds.observe(seconds["merge"])
            if committed is not None and self._last_commit is not None:
                self.round_seconds.observe(max(0.0, committed - self._last_commit))
            self._history_out += record.get("bytes_out", 0)
            if record.get("secure"):
                self._observe_secure(record["secure"])
        if committed is not None:
            self._last_commit = committed
        if record.get("validation_loss") is not None:
            self.validation_loss.set(record["validation_loss"])

    def _observe_secure(self, secure: dict[str, Any]) -> None:
        self.secure_rounds.inc()
        self.secure_recovered.inc(secure.get("dropouts_recovered", 0))
        self.secure_bytes.labels("up").inc(sum(secure.get("bytes_up", {}).values()))
        self.secure_bytes.labels("down").inc(sum(secure.get("bytes_down", {}).values()))
        for step, seconds in secure.get("seconds", {}).items():
            self.secure_seconds.labels(step).observe(seconds)

    async def keep_fresh(self, coordinator: Coordinator) -> None:
        """Refresh every second until cancelled."""
        while True:
            try:
                self.refresh(coordinator)
            except Exception:  # a metrics hiccup must never take the server down
                log.exception("refreshing the metrics failed")
            await asyncio.sleep(REFRESH_S)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts each SubmitUpdate by its outcome; every other call passes untouched."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != SUBMIT_UPDATE or handler.stream_unary is None:
            return handler
        behaviour, uploads = handler.stream_unary, self._metrics.uploads

        async def counted(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                reply = await behaviour(requests, context)
            except BaseException:
                code = context.code()
                uploads.labels(getattr(code, "name", "UNKNOWN_ERROR") if code is not None else "CANCELLED").inc()
                raise
            uploads.labels("duplicate" if reply.duplicate else "accepted" if reply.accepted else "refused").inc()
            return reply

        return grpc.stream_unary_rpc_method_handler(
            counted, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[Any, int]:
    """Start the HTTP endpoint; returns (server, real port) and logs where it listens."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    real = server.server_port
    shown = f"[{host}]" if ":" in host else host
    log.info("metrics on http://%s:%d/metrics", shown, real)
    return server, real
