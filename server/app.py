"""Assembling and running the server: state, model, gRPC service, health, signals, shutdown.

``serve`` is the whole life of a ``flora-server`` process: open the state directory, load the
model and the run off the event loop, listen, announce ``listening on HOST:PORT``, and on
SIGTERM/SIGINT (or when a finished run's linger time is over) report NOT_SERVING, release the
long-polls, give in-flight calls ``shutdown_grace_s`` to finish, let a running aggregation
commit, and close the database.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flora.server import operators
from flora.server.aggregator import Aggregator
from flora.server.allocator import tune_malloc
from flora.server.auth import AuthInterceptor, Credentials
from flora.server.config import ServerSettings
from flora.server.coordinator import Coordinator
from flora.server.dp_releases import ReleaseFileError
from flora.server.layout import Layout
from flora.server.metrics import Metrics, MetricsInterceptor, serve_metrics
from flora.server.registry import Registry, RegistryError
from flora.server.round_settings import with_stored
from flora.server.lifecycle import RoundDriver
from flora.server.servicer import CoordinatorServicer
from flora.server.startup import StartupError, open_run, raise_fd_limit, restore_machine, state_dir_path
from flora.server.store import Store
from flora.server.uploads import PieceViews
from flora.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0001  # bench/README.md, Load: health p99 at 1,000 clients 198-221 ms at 0.5 ms, 53-97 at 0.1
SERVICE_NAMES = ("", coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name)


def _secret(value) -> str | None:
    return None if value is None else value.get_secret_value()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _bind(server: grpc.aio.Server, settings: ServerSettings) -> int:
    """Listen as configured (TLS, mutual TLS or plaintext) and return the real port."""
    address = _address(settings.host, settings.port)
    try:
        if settings.tls_cert is None:
            port = server.add_insecure_port(address)
        else:
            ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
                root_certificates=ca, require_client_auth=ca is not None,
            )
            port = server.add_secure_port(address, credentials)
    except (OSError, RuntimeError) as err:
        raise StartupError(f"cannot listen on {address}: {_bind_failure(settings) or err}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {address}: {_bind_failure(settings) or 'gRPC refused the address'}")
    return port


def _bind_failure(settings: ServerSettings) -> str | None:
    """Why the OS refuses the address ("address already in use"), which gRPC's error does not say."""
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except OSError as err:
        return f"cannot resolve host {settings.host!r} ({err.strerror or err})"
    for family, kind, proto, _, where in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(where)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    return "address already in use (another flora-server, or another program, listens there)"
                return err.strerror or str(err)
    return None


def _serve_metrics(metrics: Metrics, settings: ServerSettings):
    try:
        return serve_metrics(metrics, settings.host, settings.metrics_port)[0]
    except OSError as err:
        raise StartupError(f"cannot serve metrics on {_address(settings.host, settings.metrics_port)}: {err}") from None


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in SERVICE_NAMES:
        await servicer.set(name, status)


async def _wait_for_stop(stop: asyncio.Event, driver: RoundDriver, settings: ServerSettings) -> None:
    """Until a signal arrives, or the finished run has lingered ``exit_after_finish_s``."""
    linger = settings.exit_after_finish_s
    while not stop.is_set():
        if linger is not None and driver.finished_at is not None and time.time() >= driver.finished_at + linger:
            log.info("the run is finished and exit_after_finish_s has passed: stopping")
            return
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:  # a builtin alias only from 3.11
            pass


def _grpc_server(settings: ServerSettings, credentials: Credentials, metrics: Metrics | None) -> grpc.aio.Server:
    """The gRPC server with its options and interceptors, no service yet (they need the run)."""
    limit = settings.message_limit
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
               ("grpc.so_reuseport", 0)]  # gRPC's default would let a second server share the port silently
    if settings.stream_window_bytes:  # a fixed window: no growth past it by grpc's bandwidth-delay probe
        options += [("grpc.http2.lookahead_bytes", settings.stream_window_bytes), ("grpc.http2.bdp_probe", 0)]
    return grpc.aio.server(
        interceptors=[*([MetricsInterceptor(metrics)] if metrics else []), AuthInterceptor(credentials), PieceViews()],
        options=options,
    )


async def _listen(server: grpc.aio.Server, port: int, settings: ServerSettings, coordinator: Coordinator,
                  driver: RoundDriver, metrics: Metrics | None) -> None:
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coordinator), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    exporter = refresher = None
    try:
        if metrics is not None:
            refresher = asyncio.create_task(metrics.keep_fresh(coordinator), name="metrics")
            exporter = _serve_metrics(metrics, settings)
        driver.start()
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s (run %s, method %s, version %d of %d rounds)", _address(settings.host, port),
                 coordinator.run.run_id, coordinator.run.method, driver.machine.version, settings.rounds)
        await _wait_for_stop(stop, driver, settings)
        log.info("shutting down: NOT_SERVING, %.0fs grace for calls in flight", settings.shutdown_grace_s)
    finally:
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        coordinator.stopping = True
        driver.notify()  # long-polls answer WAIT now instead of holding the shutdown
        await server.stop(settings.shutdown_grace_s)
        await driver.stop()
        if refresher is not None:
            refresher.cancel()
        if exporter is not None:
            exporter.shutdown()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def serve(settings: ServerSettings) -> None:
    """Run the server until it is told to stop; raises ``StartupError`` for unusable setups."""
    raise_fd_limit()
    tune_malloc(settings.chunk_size)  # upload pieces from the heap, not fresh pages; two arenas
    # The event loop gives the GIL up at every syscall (a SQLite statement, a file's creation,
    # each wait in select) and then waits up to the switch interval (5 ms by default) for a worker
    # thread validating or aggregating in Python to hand it back; with 1,000 clients that is tens
    # of thousands of waits a round. Large uploads run no slower at 0.1 ms (bench.transport).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        registry = Registry(settings.client_registry) if settings.client_registry is not None else None
    except RegistryError as err:
        raise StartupError(str(err)) from None
    credentials = Credentials(_secret(settings.enrollment_token), _secret(settings.operator_token), registry)
    metrics = Metrics() if settings.metrics_port is not None else None
    server = _grpc_server(settings, credentials, metrics)
    port = _bind(server, settings)  # first: a port in use fails at once, with nothing loaded or written
    try:
        layout = Layout(state_dir_path(settings))
        # The model and the validation data before the state directory: their errors leave nothing behind.
        aggregator = await asyncio.to_thread(Aggregator, settings, layout)
        layout.create()
        layout.empty_tmp()
        store = Store(layout.database)
    except BaseException:
        await server.stop(None)
        raise
    try:
        # Round settings an operator changed while the run went on (the aggregator's last round too).
        settings = aggregator.settings = with_stored(settings, store)
        run = await asyncio.to_thread(open_run, settings, layout, store, aggregator)
        machine = restore_machine(settings, store, run.version)
        try:
            driver = RoundDriver(settings, layout, store, aggregator, machine)
        except ReleaseFileError as err:  # the privacy budget's record: never accounted short
            raise StartupError(str(err)) from None
        if settings.secure_aggregation:
            driver.use_secure_aggregation(run.run_id)  # before serving: a restart takes up the attempt it interrupted
        coordinator = Coordinator(settings, layout, store, driver, run, credentials)
        operators.load_revocations(coordinator)
        await _listen(server, port, settings, coordinator, driver, metrics)
    finally:
        await server.stop(None)  # at once if it never started (or has stopped already)
        store.close()
    log.info("stopped cleanly")
