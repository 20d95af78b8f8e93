"""Why a connection to the server never came up, in words a user can act on.

gRPC reports every failed connection as UNAVAILABLE with its own wording ("Socket closed" for a
plaintext client meeting a TLS server, "Tls handshake failed" for an untrusted CA), and the
connection retries UNAVAILABLE forever, because a server that is down or restarting comes back.
A host name that does not resolve or a TLS handshake the two sides cannot agree on never comes
back by waiting: those are configuration mistakes. When gRPC says a connection never came up,
``diagnose`` repeats the connection with Python's own socket and ``ssl`` modules, set up as the
client's channel is (CA, certificate, host name), and names the cause and the fix; ``Diagnosis``
is None where nothing is wrong with the configuration (nothing listens, a temporary DNS
failure), which stays retried. ``ConnectionCheck`` counts consecutive misconfigured tries and
gives up after ``give_up_after`` of them (exit status 2, see flora.client.cli).
"""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from flora.client.config import ClientSettings, split_address

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
# gRPC's words for a connection that never came up (name, TCP or TLS), as opposed to a server
# that answered UNAVAILABLE itself (a full disk, a shutdown): only these are worth a probe.
_NEVER_CONNECTED = ("failed to connect to all addresses", "errors resolving", "DNS resolution failed")
_PERMANENT_NAME_ERRORS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
# OpenSSL's verify codes (x509_vfy.h) for a chain that does not lead to a trusted CA.
_UNTRUSTED = {2, 18, 19, 20, 21}
_EXPIRED, _NOT_YET_VALID, _NAME_MISMATCH = 10, 9, {62, 64}  # 62: a host name, 64: an IP address


@dataclass(frozen=True)
class Diagnosis:
    """A configuration mistake: what is wrong and what to change."""

    cause: str
    fix: str

    def __str__(self) -> str:
        return f"{self.cause}; {self.fix}"


class ConnectionMisconfigured(Exception):
    """The client gave up on a connection that only a change of configuration can bring up."""


def never_connected(details: str) -> bool:
    """Whether gRPC's message says that the connection itself failed (worth a diagnosis)."""
    return any(words in details for words in _NEVER_CONNECTED)


def diagnose(settings: ClientSettings, timeout: float = PROBE_TIMEOUT_S) -> Diagnosis | None:
    """Connect to ``settings.server`` as the client's channel would; the mistake, or None."""
    host, port = split_address(settings.server)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno not in _PERMANENT_NAME_ERRORS:
            return None  # a temporary DNS failure: waiting may cure it
        return Diagnosis(f"the server's host name {host!r} does not resolve ({exc.strerror})",
                         "check --server (HOST:PORT of flora-server) and this machine's DNS")
    try:
        sock = socket.create_connection((host, port), timeout)
    except OSError:
        return None  # nothing listens (a server down or restarting): retried, not a configuration mistake
    with sock:
        if not settings.uses_tls:
            return _plaintext_against(sock, host, timeout, settings.insecure)
        return _tls_handshake(sock, host, timeout, settings)


def _plaintext_against(sock: socket.socket, host: str, timeout: float, insecure: bool) -> Diagnosis | None:
    """A plaintext client: the mistake is a server that speaks TLS (a handshake completes)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False) as tls:
            tls.settimeout(timeout)
            tls.do_handshake()
    except (OSError, ssl.SSLError):
        return None  # not TLS either: some other failure
    fix = "drop --insecure and " if insecure else ""
    return Diagnosis("the server speaks TLS and this client connects in plaintext",
                     f"{fix}give --tls-ca the project's CA (ca.pem of this client's kit)")


def _tls_handshake(sock: socket.socket, host: str, timeout: float, settings: ClientSettings) -> Diagnosis | None:
    """A TLS client: the handshake as gRPC makes it, then whether the server speaks at all."""
    try:
        context = ssl.create_default_context(cafile=settings.tls_ca)
        if settings.tls_cert is not None:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        return Diagnosis(f"the TLS files cannot be used ({exc})", "give PEM files: --tls-ca, --tls-cert, --tls-key")
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False) as tls:
            tls.settimeout(timeout)
            tls.do_handshake()
            first = tls.recv(1)  # gRPC's server speaks first (HTTP/2 SETTINGS); it hangs up on a refused certificate
    except ssl.SSLCertVerificationError as exc:
        return _server_certificate(exc, host, settings.tls_ca)
    except ssl.SSLError as exc:
        if exc.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
            return Diagnosis("the server does not speak TLS (it listens in plaintext)",
                             "ask the operator to start flora-server with --tls-cert/--tls-key, or, on a network "
                             "you trust, give this client --insecure")
        return _client_certificate(settings.tls_cert) if "CERTIFICATE" in (exc.reason or "") else None
    except OSError:
        return None  # reset or timed out: not a handshake the configuration decides
    return None if first else _client_certificate(settings.tls_cert)


def _server_certificate(exc: ssl.SSLCertVerificationError, host: str, ca: Path | None) -> Diagnosis:
    """The client refused the server's certificate: expired, for another name, or untrusted."""
    if exc.verify_code in (_EXPIRED, _NOT_YET_VALID):
        state = "has expired" if exc.verify_code == _EXPIRED else "is not valid yet"
        return Diagnosis(f"the server's certificate {state}",
                         "the operator renews it (flora-admin provision --force) or fixes the server's clock")
    if exc.verify_code in _NAME_MISMATCH:
        return Diagnosis(f"the server's certificate does not name {host!r}",
                         "dial a host the certificate lists (client.toml's server) or provision with --server naming it")
    if exc.verify_code in _UNTRUSTED:
        trusted = f"--tls-ca {ca}" if ca is not None else "the system's CAs (no --tls-ca given)"
        return Diagnosis(f"the server's certificate is not signed by a CA this client trusts ({trusted})",
                         "give --tls-ca the ca.pem of this project's kit (a kit of another project does not fit)")
    return Diagnosis(f"the server's certificate was refused: {exc.verify_message}", "check --tls-ca and the server's certificate")


def _client_certificate(cert: Path | None) -> Diagnosis:
    """The server hung up after the handshake: it refused this client's certificate, or its absence."""
    if cert is None:
        return Diagnosis("the server requires a client certificate (mutual TLS)",
                         "give --tls-cert and --tls-key (client.pem and client-key.pem of this client's kit)")
    expiry = _expiry(cert)
    if expiry is not None and expiry < datetime.datetime.now(datetime.timezone.utc):
        return Diagnosis(f"this client's certificate {cert} expired on {expiry:%Y-%m-%d %H:%M} UTC",
                         "ask the operator for a new kit (flora-admin provision --add-client)")
    return Diagnosis(f"the server refused this client's certificate {cert} (not signed by the CA it trusts)",
                     "use the certificate of this project's kit (a kit of another project does not fit)")


def _expiry(cert: Path) -> datetime.datetime | None:
    try:
        return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return None


class ConnectionCheck:
    """Counts consecutive failed connections diagnosed as a configuration mistake; gives up at the limit."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.misconfigured = 0

    def failed(self, details: str) -> None:
        """After a transient failure: diagnose it, log the cause, raise ConnectionMisconfigured at the limit."""
        diagnosis = diagnose(self.settings) if never_connected(details) else None
        if diagnosis is None:
            self.misconfigured = 0
            return
        self.misconfigured += 1
        limit = self.settings.give_up_after
        log.warning("event=connection_misconfigured server=%s cause=%r fix=%r try=%d of=%s", self.settings.server,
                    diagnosis.cause, diagnosis.fix, self.misconfigured, limit or "unlimited")
        if limit and self.misconfigured >= limit:
            raise ConnectionMisconfigured(f"cannot connect to {self.settings.server}: {diagnosis} "
                                          f"(gave up after {self.misconfigured} tries, see --give-up-after)")

    def succeeded(self) -> None:
        """A call went through: the count starts over."""
        self.misconfigured = 0
