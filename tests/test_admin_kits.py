"""Provisioned startup kits end to end: a server and two client daemons started only from their
kits complete a round over mutual TLS on loopback, while a third kit's holder (a scripted
client) is removed by the operator mid-round; metrics, status --json and the report are checked
against the same real run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from prometheus_client.parser import text_string_to_metric_families

from client_harness import FAST_FLAGS, write_data
from flora.server.admin.cli import main as admin
from flora.server.admin.connect import OperatorSettings, metadata, operator_stub
from flora.server.registry import cert_sha256
from flora.v1 import coordinator_pb2 as pb
from flora.v1 import coordinator_pb2_grpc
from harness import ScriptedClient, ServerProcess, start_server

pytestmark = pytest.mark.slow
CLIENTS = ("hospital-a", "bank-b", "site-c")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_kit_client(kit: Path, data: Path, log: Path, seed: int) -> subprocess.Popen:
    """flora-client with nothing but its kit's client.toml, its data and its seed (the tiny model's
    tokenizer reads the test data's digits alike: the same seed would train the same bytes)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "flora.client.cli", "--config", str(kit / "client.toml"),
                                 "--data", str(data), "--seed", str(seed), *FAST_FLAGS],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def kit_token(kit: Path) -> str:
    import tomllib

    return tomllib.loads((kit / "client.toml").read_text())["token"]


def kit_client(kit: Path, port: int) -> ScriptedClient:
    """A scripted protocol participant holding a kit's certificate (mutual TLS)."""
    credentials = grpc.ssl_channel_credentials((kit / "ca.pem").read_bytes(), (kit / "client-key.pem").read_bytes(),
                                               (kit / "client.pem").read_bytes())
    return ScriptedClient(f"127.0.0.1:{port}", kit.name, credentials=credentials)


def operator(kits: Path) -> OperatorSettings:
    from flora.common.settings import load_settings

    return load_settings(OperatorSettings, config_file=kits / "operator" / "operator.toml")


def wait_for(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@contextlib.contextmanager
def provisioned_server(tmp_path: Path) -> Iterator[tuple[int, Path, ServerProcess]]:
    """Kits for a port, and a server listening there. The port is written into the kits before the
    server binds it, so another process (a parallel test's server) may take it in between: the server
    then says so at once, and the kits are provisioned again for another port."""
    validation = write_data(tmp_path / "validation.json", "dolly", 8, offset=50)
    for attempt in range(3):
        port, kits = free_port(), tmp_path / "kits"
        shutil.rmtree(kits, ignore_errors=True)
        assert admin(["provision", "--project", "trial", "--server", "127.0.0.1,localhost", "--port", str(port),
                      "--clients", ",".join(CLIENTS[:2]), "--out", str(kits)]) == 0
        assert admin(["provision", "--out", str(kits), "--add-client", CLIENTS[2]]) == 0
        flags = ("--config", str(kits / "server" / "server.toml"), "--port", str(port), "--rounds", "1",
                 "--min-clients", "3", "--local-steps", "2", "--validation-data", str(validation), "--metrics-port", "0",
                 "--client-timeout-s", "600", "--round-deadline-s", "300")
        try:
            server = start_server(tmp_path / "state", *flags)
            break
        except RuntimeError as error:
            if "address already in use" not in str(error) or attempt == 2:
                raise
    try:
        yield port, kits, server
    finally:
        server.kill()


def test_kits_run_a_round_over_mutual_tls_and_the_operator_removes_a_client(tmp_path, capsys):
    with provisioned_server(tmp_path) as (port, kits, server):
        metrics_url = wait_for(lambda: next((line.split("metrics on ", 1)[1].split()[0] for line in server.lines
                                             if "metrics on http://" in line), None), 60, "the metrics line")
        settings = operator(kits)
        channel, stub = operator_stub(settings)
        status = lambda: stub.Status(pb.StatusRequest(), metadata=metadata(settings), timeout=10)  # noqa: E731
        removed = kit_client(kits / "clients" / "site-c", port)
        removed.join(status().run.base_model_hash, token=kit_token(kits / "clients" / "site-c"))
        clients = {name: start_kit_client(kits / "clients" / name, write_data(tmp_path / f"{name}.json", "alpaca", 12, k),
                                          tmp_path / f"{name}.log", seed=k) for k, name in enumerate(CLIENTS[:2])}
        try:
            wait_for(lambda: status().round.state == "open", 240, "round 1 to open with all three clients")
            assert removed.client_id in status().round.selected
            reply = stub.RemoveClient(pb.RemoveClientRequest(client_name="site-c", reason="test"),
                                      metadata=metadata(settings), timeout=10)
            assert reply.client_id == removed.client_id and not reply.already_removed
            # Its next call is refused, its token gone for Join too; the run goes on without it.
            with pytest.raises(grpc.RpcError) as refused:
                removed.next_task()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as rejoin:
                removed.join(status().run.base_model_hash, token=kit_token(kits / "clients" / "site-c"))
            assert rejoin.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for name in CLIENTS[:2]:
                assert clients[name].wait(240) == 0, (tmp_path / f"{name}.log").read_text()
            final = status()
        finally:
            removed.close()
            for process in clients.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
        assert final.state == "finished" and final.global_version == 1
        assert {c.client_name: c.state for c in final.clients}["site-c"] == "removed"
        assert [r.num_clients for r in final.recent_rounds] == [2]

        # The removed client's certificate is refused even with a valid (operator) token.
        kit = kits / "clients" / "site-c"
        revoked = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(
            (kit / "ca.pem").read_bytes(), (kit / "client-key.pem").read_bytes(), (kit / "client.pem").read_bytes()))
        with pytest.raises(grpc.RpcError) as refused:
            coordinator_pb2_grpc.CoordinatorStub(revoked).Status(pb.StatusRequest(), metadata=metadata(settings), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in refused.value.details()
        revoked.close()

        # A kit of another project (another CA) fails the TLS handshake.
        assert admin(["provision", "--project", "other", "--server", "127.0.0.1", "--port", str(port),
                      "--clients", "mallory", "--out", str(tmp_path / "other")]) == 0
        other = tmp_path / "other" / "clients" / "mallory"
        foreign = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(
            (kits / "server" / "ca.pem").read_bytes(), (other / "client-key.pem").read_bytes(), (other / "client.pem").read_bytes()))
        with pytest.raises(grpc.RpcError) as handshake:
            coordinator_pb2_grpc.CoordinatorStub(foreign).Status(
                pb.StatusRequest(), metadata=metadata(settings), timeout=10)
        assert handshake.value.code() == grpc.StatusCode.UNAVAILABLE
        foreign.close()

        # flora-admin status --json is the server's Status reply.
        capsys.readouterr()
        assert admin(["status", "--config", str(kits / "operator" / "operator.toml"), "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        direct = MessageToDict(status(), always_print_fields_with_no_presence=True)
        for entry in printed["clients"] + direct["clients"]:
            entry.pop("lastSeenUnixMs")  # moves on with every call
        assert printed == direct
        assert admin(["health", "--config", str(kits / "operator" / "operator.toml")]) == 0
        assert "SERVING" in capsys.readouterr().out

        # The metrics agree with the run's own history.
        history = [json.loads(line) for line in (tmp_path / "state" / "history.jsonl").read_text().splitlines()]
        samples = wait_for(lambda: (s := scrape(metrics_url))[("flora_rounds_committed_total", ())] == 1 and s, 10, "metrics")
        assert samples[("flora_global_version", ())] == 1
        assert samples[("flora_uploads_total", (("outcome", "accepted"),))] == sum(r["num_clients"] for r in history[1:])
        assert samples[("flora_bytes_in_total", ())] == sum(r["bytes_in"] for r in history[1:])
        # Downloads of the final version come after its history line: the counter includes them.
        assert samples[("flora_bytes_out_total", ())] >= sum(r["bytes_out"] for r in history[1:])
        assert samples[("flora_bytes_out_total", ())] > 0
        assert samples[("flora_validation_loss", ())] == pytest.approx(history[-1]["validation_loss"])
        assert samples[("flora_round_duration_seconds_count", ())] == 1
        assert samples[("flora_merge_seconds_count", ())] == 1
        assert samples[("flora_connected_clients", ())] >= 0
        channel.close()

    assert admin(["report", str(tmp_path / "state")]) == 0
    assert (tmp_path / "state" / "report.png").stat().st_size > 10_000
    assert "| 1 " in (tmp_path / "state" / "report.md").read_text()
    # The kit's certificate digest in the server's registry is the certificate handed out.
    registry = (kits / "server" / "clients.toml").read_text()
    assert cert_sha256((kits / "clients" / "hospital-a" / "client.pem").read_bytes()) in registry
