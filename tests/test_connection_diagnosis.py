"""Connection and TLS mistakes are named with their fix and end the client after --give-up-after
tries, over real TLS (certificates from flora-admin's PKI, a gRPC server on loopback); a server
that is down stays retried (tests/test_client_connection.py)."""

from __future__ import annotations

import contextlib
import datetime
import socket
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from client_harness import wait_until, write_data
from fake_coordinator import FakeCoordinator, tiny_spec
from flora.client.config import ClientSettings
from flora.client.connection import Connection
from flora.client.diagnosis import ConnectionMisconfigured, diagnose
from flora.server.admin import pki
from flora.server.admin.cli import main as admin
from flora.server.handshakes import HandshakeLog
from harness import running_server
from flora.v1 import coordinator_pb2, coordinator_pb2_grpc

FAST = {"backoff_initial": 0.01, "backoff_max": 0.05, "rpc_timeout": 5}


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, Path]:
    """PEM files: a project's CA, server and client; another project's; expired ones; a server for another name."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other = pki.make_ca("trial", 1), pki.make_ca("other", 1)
    pairs = {
        "ca": ca, "other-ca": other,
        "server": pki.server_cert(ca, "trial", ["127.0.0.1", "localhost"], 1),
        "elsewhere": pki.server_cert(ca, "trial", ["flora.example.org"], 1),
        "client": pki.client_cert(ca, "trial", "alice", 1),
        "foreign": pki.client_cert(other, "other", "mallory", 1),
    }
    with pytest.MonkeyPatch.context() as patch:  # valid from three days ago until yesterday
        patch.setattr(pki, "_BACKDATE", datetime.timedelta(days=3))
        pairs["expired-server"] = pki.server_cert(ca, "trial", ["127.0.0.1"], -1)
        pairs["expired-client"] = pki.client_cert(ca, "trial", "alice", -1)
    paths = {}
    for name, pair in pairs.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(pair.cert_pem)
        paths[f"{name}-key"] = folder / f"{name}-key.pem"
        paths[f"{name}-key"].write_bytes(pair.key_pem)
    return paths


@contextlib.contextmanager
def serving(pem: dict[str, Path], cert: str | None, mutual: bool = False) -> Iterator[int]:
    """A Coordinator on a free loopback port: TLS with ``cert`` (plaintext when None), mutual if asked."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(FakeCoordinator(tiny_spec()), server)
    if cert is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials(
            [(pem[f"{cert}-key"].read_bytes(), pem[cert].read_bytes())],
            root_certificates=pem["ca"].read_bytes() if mutual else None, require_client_auth=mutual,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=0)


def settings(tmp_path: Path, pem: dict[str, Path], server: str, ca: str | None = None, cert: str | None = None,
             **extra) -> ClientSettings:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    tls = {"tls_ca": pem[ca] if ca else None, "tls_cert": pem[cert] if cert else None,
           "tls_key": pem[f"{cert}-key"] if cert else None}
    return ClientSettings(name="alice", data=[data], server=server, **tls, **FAST, **extra)


def call(config: ClientSettings) -> coordinator_pb2.GetRunReply:
    conn = Connection(config, threading.Event())
    try:
        return conn.call("GetRun", coordinator_pb2.GetRunRequest())
    finally:
        conn.close()


MISTAKES = [  # (server certificate, mutual TLS, client's CA, client's certificate, the cause in words)
    ("server", False, None, None, "the server speaks TLS and this client connects in plaintext"),
    ("server", False, "other-ca", None, "not signed by a CA this client trusts"),
    ("expired-server", False, "ca", None, "the server's certificate has expired"),
    ("elsewhere", False, "ca", None, "the server's certificate does not name '127.0.0.1'"),
    ("server", True, "ca", None, "the server requires a client certificate (mutual TLS)"),
    ("server", True, "ca", "foreign", "the server refused this client's certificate"),
    ("server", True, "ca", "expired-client", "this client's certificate"),  # ... expired on <date>
    (None, False, "ca", None, "the server does not speak TLS"),
]


@pytest.mark.parametrize(("cert", "mutual", "ca", "client_cert", "cause"), MISTAKES)
def test_a_mistake_is_named_and_the_client_gives_up_after_the_limit(tmp_path, pem, cert, mutual, ca, client_cert, cause):
    with serving(pem, cert, mutual) as port:
        config = settings(tmp_path, pem, f"127.0.0.1:{port}", ca, client_cert, give_up_after=2)
        assert cause in diagnose(config).cause
        with pytest.raises(ConnectionMisconfigured, match="gave up after 2 tries") as gave_up:
            call(config)
    assert cause in str(gave_up.value)


def test_an_expired_client_certificate_is_named_with_its_date(tmp_path, pem):
    with serving(pem, "server", mutual=True) as port:
        found = diagnose(settings(tmp_path, pem, f"127.0.0.1:{port}", "ca", "expired-client"))
    # Certificates are dated in UTC: the local date may be another day.
    today = datetime.datetime.now(datetime.timezone.utc).date()
    assert f"expired on {today - datetime.timedelta(days=1):%Y-%m-%d}" in found.cause
    assert "new kit" in found.fix


def test_a_host_name_that_does_not_resolve_is_a_mistake(tmp_path, pem, monkeypatch):
    def no_such_name(host, *args, **kwargs):  # what a resolver answers for a name that does not exist
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)  # offline resolvers answer EAI_AGAIN instead
    config = settings(tmp_path, pem, "no-such-host.invalid:50051", "ca", give_up_after=1)
    assert "'no-such-host.invalid' does not resolve" in diagnose(config).cause
    with pytest.raises(ConnectionMisconfigured, match="--server"):
        call(config)


@pytest.mark.parametrize("mutual", [False, True])
def test_a_right_configuration_connects_and_has_no_diagnosis(tmp_path, pem, mutual):
    with serving(pem, "server", mutual) as port:
        config = settings(tmp_path, pem, f"127.0.0.1:{port}", "ca", "client" if mutual else None, give_up_after=1)
        assert diagnose(config) is None
        assert call(config).run.run_id


def test_nothing_listening_is_no_configuration_mistake(tmp_path, pem):
    """A server that is down or restarting comes back: the client waits for it (no give-up)."""
    assert diagnose(settings(tmp_path, pem, "127.0.0.1:9", "ca")) is None
    assert diagnose(settings(tmp_path, pem, "127.0.0.1:9")) is None


CORE_LINES = """\
I1205 05:03:14.777473    9812 handshaker.cc:155] CallNextHandshakerLocked: error=OK shutdown=false index=0, args={endpoint=0x7f5d08001b80}
I1205 05:03:14.777484    9812 channel_trace.h:396] handshake manager 0x7f5d08002060:  calling handshaker endpoint_info at index 0
I1205 05:03:14.777501    9812 handshaker.cc:155] CallNextHandshakerLocked: error=OK shutdown=false index=1, args={endpoint=0x7f5d08001b80, args={grpc.internal.endpoint_local_address=ipv4:127.0.0.1:47113, grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:40550}}
I1205 05:03:14.777602    9810 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context
I1205 05:03:14.777637    9810 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK
=== Source Location Trace: === 
src/core/util/status_helper.cc:68
 shutdown=false index=2, args={endpoint=0x7f5d08001b80, args={grpc.internal.endpoint_local_address=ipv4:127.0.0.1:47113, grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:40550, grpc.resource_quota=0x55b05a1f32d0}}
I1205 05:03:14.777653    9810 channel_trace.h:396] handshake manager 0x7f5d08002060: Failed with error: UNKNOWN: Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK
=== Source Location Trace: === 
src/core/util/status_helper.cc:68
a line of someone else's on descriptor 2
I1205 05:03:14.784101    9810 handshaker.cc:155] CallNextHandshakerLocked: error=UNAVAILABLE: Handshake read failed (Socket closed) shutdown=false index=2, args={endpoint=0x7f5d0800d500, args={grpc.internal.endpoint_peer_address=ipv6:[::1]:40564}}
E1205 05:03:15.000000    9810 chttp2_server.cc:42] a gRPC error that is not a handshake's
"""


def test_the_core_handshake_records_become_one_line_with_peer_and_reason():
    reports = []
    handshakes = HandshakeLog(lambda peer, reason: reports.append((peer, reason)))
    kept = [line for line in map(handshakes.line, CORE_LINES.splitlines()) if line is not None]
    assert reports == [("127.0.0.1:40550", "the client speaks plaintext, not TLS (it needs --tls-ca)"),
                       ("[::1]:40564", "the client hung up during the handshake (it may not trust this server's "
                                       "certificate: check its --tls-ca)")]
    assert kept == ["a line of someone else's on descriptor 2", CORE_LINES.splitlines()[-1]]


@pytest.mark.slow
def test_a_plaintext_client_against_a_kit_server_stops_with_the_fix_and_the_server_names_the_peer(tmp_path):
    """flora-admin's kits, the real flora-server and flora-client: exit 2 in words on both sides."""
    assert admin(["provision", "--project", "trial", "--server", "127.0.0.1", "--clients", "alice",
                  "--out", str(tmp_path / "kits")]) == 0
    data = write_data(tmp_path / "alice.json", "alpaca", 4)
    with running_server(tmp_path / "state", "--config", str(tmp_path / "kits" / "server" / "server.toml")) as server:
        client = subprocess.run(
            [sys.executable, "-m", "flora.client.cli", "--server", server.address, "--name", "alice", "--data", str(data),
             "--state-dir", str(tmp_path / "client"), "--give-up-after", "2", "--backoff-initial", "0.05",
             "--backoff-max", "0.1"], capture_output=True, text=True, timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        )
        wait_until(lambda: "tls_handshake_failed" in server.output(), 30, "the server to log the handshake")
    assert client.returncode == 2, client.stderr
    assert client.stderr.strip().splitlines()[-1] == (
        f"flora-client: cannot connect to {server.address}: the server speaks TLS and this client connects in plaintext; "
        "give --tls-ca the project's CA (ca.pem of this client's kit) (gave up after 2 tries, see --give-up-after)")
    logged = [line for line in server.lines if "event=tls_handshake_failed" in line]
    assert logged and all(" peer=127.0.0.1:" in line for line in logged)
    assert any("speaks plaintext, not TLS" in line for line in logged)  # beside the client's probe (TLS, no certificate)
    assert "ssl_transport_security" not in server.output() and "handshaker.cc" not in server.output()
