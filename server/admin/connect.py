"""How ``flora-admin`` reaches a server as its operator: address, operator token, TLS.

The same layered settings as the daemons (``flora.common.settings``): an ``operator.toml`` from
the operator kit (``--config``), then ``FLORA_ADMIN_*`` environment variables, then flags.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict, Field, FilePath, SecretStr, field_validator, model_validator

from flora.common.addresses import is_loopback
from flora.v1 import coordinator_pb2_grpc

ENV_PREFIX = "FLORA_ADMIN_"


class OperatorSettings(BaseModel):
    """Where the server is and how the operator proves who they are."""

    model_config = ConfigDict(extra="forbid")

    server: str = Field("localhost:50051", min_length=3, description="address of flora-server, HOST:PORT")
    token: SecretStr | None = Field(None, description="the server's operator token")
    tls_ca: FilePath | None = Field(None, description="PEM CA bundle to verify the server with")
    tls_cert: FilePath | None = Field(None, description="PEM client certificate when the server requires mutual TLS")
    tls_key: FilePath | None = Field(None, description="PEM private key of tls_cert")
    insecure: bool = Field(False, description="allow plaintext to a non-loopback server")
    timeout: float = Field(10.0, gt=0, le=600, description="deadline of each call, in seconds")

    @field_validator("server")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OperatorSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def uses_tls(self) -> bool:
        """TLS unless insecure, or a loopback server with no CA or certificate given."""
        if self.insecure:
            return False
        host = self.server.rpartition(":")[0].strip("[]")
        return self.tls_ca is not None or self.tls_cert is not None or not is_loopback(host)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def operator_stub(settings: OperatorSettings) -> tuple[grpc.Channel, coordinator_pb2_grpc.CoordinatorStub]:
    """A channel to the server (TLS as configured) and the Coordinator stub on it."""
    if settings.uses_tls:
        credentials = grpc.ssl_channel_credentials(_read(settings.tls_ca), _read(settings.tls_key), _read(settings.tls_cert))
        channel = grpc.secure_channel(settings.server, credentials)
    else:
        channel = grpc.insecure_channel(settings.server)
    return channel, coordinator_pb2_grpc.CoordinatorStub(channel)


def metadata(settings: OperatorSettings) -> tuple[tuple[str, str], ...]:
    """The operator token as call metadata (none when unset: the server then says what it needs)."""
    return (("authorization", f"Bearer {settings.token.get_secret_value()}"),) if settings.token else ()
