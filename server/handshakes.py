"""Failed TLS handshakes as one log line each, with the peer and the reason in words.

gRPC's C core reports a failed handshake only as a raw line on file descriptor 2, without the
peer (``ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: ...
WRONG_VERSION_NUMBER``), and tells Python nothing. With its ``handshaker`` trace on, the core also
writes, per failed handshake, a record holding the error and ``endpoint_peer_address``.
``install`` turns that trace on and points descriptor 2 at a pipe (Python's own ``sys.stderr``
keeps the terminal or log file); a small child process (this module run as a script) reads what
the core writes, logs each failed handshake as ``event=tls_handshake_failed peer=... reason=...``,
drops the trace's other records and the raw line, and passes every other line through unchanged.
A child, not a thread: whatever reaches descriptor 2 just before the server dies (a core
assertion before its abort, a fatal Python error, a killed process's last words) is still read
and written, because the reader outlives the writer and stops only at the pipe's end. It runs in
a process group of its own, so a Ctrl-C to the server's group does not stop it before the
server's shutdown lines; it ends when the last holder of the pipe (the server, or a process the
server started) exits.
``HandshakeLog`` is the pure part.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import BinaryIO, TextIO

log = logging.getLogger("flora.server.handshakes")  # the same name when run as the child
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the server's (flora.server.cli)

# glog's prefix of a core record: "I1205 05:03:14.777602    9810 ssl_transport_security.cc:2563] ".
_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?P<source>[\w./-]+):\d+\] (?P<body>.*)$")
_TRACE_SOURCES = ("handshaker.cc", "channel_trace.h")
_CONTINUATION = re.compile(r"^(=== Source Location Trace: ===\s*|[\w./-]+\.(cc|h):\d+)$")
_PEER = re.compile(r"endpoint_peer_address=(?:ipv[46]:)?(?P<peer>[^,}\s]+)")
_REASONS = (
    (("WRONG_VERSION_NUMBER", "HTTP_REQUEST"), "the client speaks plaintext, not TLS (it needs --tls-ca)"),
    (("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"),
     "the client sent no certificate, and this server requires mutual TLS (--tls-client-ca)"),
    (("Socket closed", "Connection reset", "End of TCP stream"),
     "the client hung up during the handshake (it may not trust this server's certificate: check its --tls-ca)"),
)


def reason_in_words(error: str) -> str:
    """What went wrong, from the core's error text, with the fix where the text tells it."""
    for needles, words in _REASONS:
        if any(needle in error for needle in needles):
            return words
    verify = re.search(r"CERTIFICATE_VERIFY_FAILED: (?P<why>[^:]+)", error)
    if verify:
        return f"the client's certificate failed verification ({verify['why'].strip()}): not from this project's CA, or expired"
    return error.removesuffix(": OK").strip()


class HandshakeLog:
    """Reads the core's lines one at a time: logs failed handshakes, drops the trace, returns the rest."""

    def __init__(self, report: Callable[[str, str], None]) -> None:
        self._report = report
        self._pending: str | None = None  # a failure's error, waiting for its peer on a continuation line

    def line(self, text: str) -> str | None:
        """The line to pass through, or None where it was the trace's (or reported)."""
        record = _RECORD.match(text)
        if record is None:
            return self._continuation(text)
        self._pending = None
        source, body = record["source"].rsplit("/", 1)[-1], record["body"]
        if "CallNextHandshakerLocked: error=" in body:
            error = body.split("error=", 1)[1].split(" shutdown=", 1)[0]
            if not error.startswith("OK"):
                self._failed(error, body)
            return None
        if source in _TRACE_SOURCES or body.startswith("gRPC Tracers:") or (
            source == "ssl_transport_security.cc" and "Handshake failed" in body
        ):
            return None
        return text

    def _continuation(self, text: str) -> str | None:
        if _CONTINUATION.match(text.strip()) or "endpoint_peer_address=" in text or text.lstrip().startswith("shutdown="):
            if self._pending is not None and "shutdown=" in text:
                error, self._pending = self._pending, None
                self._failed(error, text)
            return None
        return text

    def _failed(self, error: str, text: str) -> None:
        peer = _PEER.search(text)
        if peer is None:
            self._pending = error  # the peer comes on a continuation line
            return
        self._report(peer["peer"], reason_in_words(error))


def _report(peer: str, reason: str) -> None:
    log.warning("event=tls_handshake_failed peer=%s reason=%r", peer, reason)


def install(level: str = "INFO") -> None:
    """Route the core's descriptor 2 through ``HandshakeLog`` in a child process; call before
    ``grpc`` is imported. ``level`` is the server's log level (the child logs in its format)."""
    if "grpc" in sys.modules:
        raise RuntimeError("handshakes.install() must run before grpc is imported (the core reads GRPC_TRACE once)")
    os.environ["GRPC_TRACE"] = ",".join(filter(None, [os.environ.get("GRPC_TRACE"), "handshaker"]))
    sys.stderr.flush()
    kept = os.dup(2)
    read_end, write_end = os.pipe()
    subprocess.Popen([sys.executable, "-m", __name__, level], stdin=read_end, stdout=kept, stderr=kept, close_fds=True,
                     process_group=0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = open(kept, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=True)
    faulthandler.enable(sys.stderr)  # a crash's traceback to the terminal directly, not through the pipe


def pump(lines: BinaryIO, out: TextIO) -> None:
    """Read the core's lines to the end; write the ones HandshakeLog keeps to ``out``."""
    handshakes = HandshakeLog(_report)
    for raw in lines:
        kept = handshakes.line(raw.decode("utf-8", errors="replace").rstrip("\n"))
        if kept is not None:
            out.write(kept + "\n")
            out.flush()


if __name__ == "__main__":  # the child that install() starts
    logging.basicConfig(level=sys.argv[1].upper(), format=LOG_FORMAT, stream=sys.stderr)
    pump(sys.stdin.buffer, sys.stderr)
