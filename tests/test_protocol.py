"""The committed protocol stubs are current and the service has the calls DESIGN.md asks for."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = sorted((ROOT / "protos" / "flora" / "v1").glob("*_pb2*.py*"))


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed")
def test_committed_stubs_match_a_fresh_generation(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted((tmp_path / "flora" / "v1").glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in GENERATED]
    stale = [p.name for p, f in zip(GENERATED, fresh) if p.read_bytes() != f.read_bytes()]
    assert not stale, f"stubs out of date, run `python protos/generate.py`: {stale}"


def test_coordinator_service_has_every_call():
    from flora.v1 import coordinator_pb2

    service = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    calls = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert calls == {
        "GetRun": (False, False),
        "Join": (False, False),
        "NextTask": (False, False),
        "FetchGlobal": (False, True),
        "SubmitUpdate": (True, False),
        "Heartbeat": (False, False),
        "Leave": (False, False),
        "Status": (False, False),
        "ListClients": (False, False),
        "RemoveClient": (False, False),
        "ReadmitClient": (False, False),
        "Settings": (False, False),
        "AdvertiseKeys": (False, False),
        "ShareKeys": (False, False),
        "SubmitMasked": (True, False),
        "FetchSecure": (False, True),
        "Unmask": (False, False),
    }


def test_every_message_and_field_is_commented():
    for proto in sorted((ROOT / "protos" / "flora" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_decl = stripped.startswith(("message ", "enum ", "service ", "rpc "))
            is_field = "=" in stripped and stripped.endswith(";") and not stripped.startswith(("syntax", "package", "option", "//"))
            if (is_decl or is_field) and not stripped.startswith("oneof"):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} lacks a comment: {stripped}"


def test_the_documents_describe_the_protocol_without_pointing_at_python_code():
    """An outsider writes a client from the .proto files and PROTOCOL.md alone: no flora module is
    named where an algorithm should be (the fingerprint), and what the code answers is written down."""
    for proto in sorted((ROOT / "protos" / "flora" / "v1").glob("*.proto")):
        assert "flora.common" not in proto.read_text() and ".py" not in proto.read_text(), proto.name
    protocol = (ROOT / "protos" / "PROTOCOL.md").read_text()
    for promise in ("a joined client's token under another name fails `INVALID_ARGUMENT`",
                    "S_i > S_0 * eps * sqrt(n)", "\"The module's rank\" is rho",
                    "A version beyond the latest\n  fails `OUT_OF_RANGE`", "removed by the operator:",
                    "needs <min_clients> connected clients, has <n>"):
        assert promise in protocol, promise
