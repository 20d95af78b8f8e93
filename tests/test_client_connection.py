"""The client's calls: backoff with full jitter, retries, re-join on UNAUTHENTICATED, prompt stop."""

from __future__ import annotations

import random
import threading

import grpc
import pytest

from client_harness import wait_until
from fake_coordinator import FakeCoordinator, Fault, serving, tiny_spec
from flora.client.config import ClientSettings
from flora.client.connection import Backoff, Connection, Stopped
from flora.v1 import coordinator_pb2


def test_backoff_doubles_up_to_the_cap_with_full_jitter():
    backoff = Backoff(0.5, 4.0, random.Random(0))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    delays = [backoff.next_delay() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    backoff.reset()
    assert backoff.next_delay() <= 0.5


@pytest.fixture()
def fake():
    return FakeCoordinator(tiny_spec())


@pytest.fixture()
def connect(tmp_path, fake):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    with serving(fake) as address:
        made = []

        def make(stop: threading.Event | None = None) -> Connection:
            settings = ClientSettings(name="a", data=[data], server=address, backoff_initial=0.01, backoff_max=0.05, rpc_timeout=5)
            made.append(Connection(settings, stop or threading.Event()))
            made[-1].token = "tok"
            return made[-1]

        yield make
        for conn in made:
            conn.close()


def test_transient_codes_are_retried_others_are_not(connect, fake):
    conn = connect()
    fake.faults["Heartbeat"] = [Fault(grpc.StatusCode.UNAVAILABLE), Fault(grpc.StatusCode.DEADLINE_EXCEEDED),
                                Fault(grpc.StatusCode.RESOURCE_EXHAUSTED)]  # the last: the server's disk is full
    conn.call("Heartbeat", coordinator_pb2.HeartbeatRequest(round=1))
    assert len(fake.requests["Heartbeat"]) == 4
    fake.faults["Heartbeat"] = [Fault(grpc.StatusCode.PERMISSION_DENIED)]
    with pytest.raises(grpc.RpcError) as err:
        conn.call("Heartbeat", coordinator_pb2.HeartbeatRequest(round=1))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_unauthenticated_rejoins_once_then_gives_up(connect, fake):
    conn = connect()
    rejoins = []
    conn.on_unauthenticated = lambda: rejoins.append(1)
    fake.faults["Heartbeat"] = [Fault(grpc.StatusCode.UNAUTHENTICATED)]
    conn.call("Heartbeat", coordinator_pb2.HeartbeatRequest())
    assert rejoins == [1]
    fake.faults["Heartbeat"] = [Fault(grpc.StatusCode.UNAUTHENTICATED)] * 2
    with pytest.raises(grpc.RpcError):
        conn.call("Heartbeat", coordinator_pb2.HeartbeatRequest())
    assert fake.metadata["Heartbeat"][-1] == "Bearer tok"


def test_stop_cancels_a_long_poll_at_once(connect, fake):
    fake.hold_s = 3600  # far past the test timeout: only a cancellation ends this call
    stop = threading.Event()
    conn = connect(stop)
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(Stopped):
        conn.call("NextTask", coordinator_pb2.NextTaskRequest(max_wait_ms=3_600_000), timeout=7200)
    wait_until(lambda: fake.abandoned == ["NextTask"], 60, "the server to see the call cancelled")


def test_a_server_that_is_down_is_retried_until_stop(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    settings = ClientSettings(name="a", data=[data], server="127.0.0.1:9", backoff_initial=0.01, backoff_max=0.05, rpc_timeout=1)
    stop = threading.Event()
    conn = Connection(settings, stop)
    threading.Timer(0.5, stop.set).start()
    with pytest.raises(Stopped):
        conn.call("Heartbeat", coordinator_pb2.HeartbeatRequest())
    conn.close()


def test_a_message_over_grpcs_size_limit_is_not_retried_as_a_full_disk_would_be(connect, fake):
    conn = connect()
    fake.faults["Heartbeat"] = [Fault(grpc.StatusCode.RESOURCE_EXHAUSTED, details="Received message larger than max (5 vs. 4)")]
    with pytest.raises(grpc.RpcError) as err:
        conn.call("Heartbeat", coordinator_pb2.HeartbeatRequest(round=1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(fake.requests["Heartbeat"]) == 1
