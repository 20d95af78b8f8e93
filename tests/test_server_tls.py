"""TLS and mutual TLS: the server listens with certificates, and mTLS refuses clients without one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from harness import OPERATOR_TOKEN, ScriptedClient, running_server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A private CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    paths = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "server", "server-key", "client", "client-key")}
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
            "-keyout", str(paths["ca-key"]), "-out", str(paths["ca"]))
    extensions = folder / "san.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        request = folder / f"{name}.csr"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(paths[f"{name}-key"]), "-out", str(request))
        openssl("x509", "-req", "-in", str(request), "-CA", str(paths["ca"]), "-CAkey", str(paths["ca-key"]),
                "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(paths[name]))
    return paths


def test_mutual_tls_accepts_only_clients_with_a_certificate(tmp_path):
    certs = make_certificates(tmp_path)
    flags = ("--tls-cert", str(certs["server"]), "--tls-key", str(certs["server-key"]),
             "--tls-client-ca", str(certs["ca"]), "--operator-token", OPERATOR_TOKEN)
    with running_server(tmp_path / "state", *flags) as server:
        trusted = grpc.ssl_channel_credentials(
            root_certificates=certs["ca"].read_bytes(),
            private_key=certs["client-key"].read_bytes(), certificate_chain=certs["client"].read_bytes(),
        )
        with_certificate = ScriptedClient(server.address, "operator", token=OPERATOR_TOKEN, credentials=trusted)
        assert with_certificate.status().run.base_model_hash
        anonymous_tls = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
        for credentials in (anonymous_tls, None):
            refused = ScriptedClient(server.address, "operator", token=OPERATOR_TOKEN, credentials=credentials)
            with pytest.raises(grpc.RpcError) as error:
                refused.status()
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            refused.close()
