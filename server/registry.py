"""The provisioned clients of a project: who may join, with which token and which certificate.

``flora-admin provision`` writes ``clients.toml`` into the server's kit: per client name the
sha256 of its token and of its certificate, never the secrets themselves. A server configured
with ``client_registry`` lets only those clients join, each with its own token (no shared
enrolment token), and re-reads the file when it changes, so that ``provision --add-client``
takes effect without a restart.

A client the operator removes is marked in the file itself (``removed = "<reason>"``), not only
in the run: its kit stays refused by every later run on this registry until the operator
re-admits it (``flora-admin clients readmit NAME``), which clears the mark.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from flora.common.chunks import write_atomic

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RegistryError(ValueError):
    """A clients file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Provisioned:
    """One provisioned client: its name and the digests of its token and certificate."""

    name: str
    token_sha256: str
    cert_sha256: str = ""
    removed: str | None = None  # why the operator removed it; None while it is admitted
    removed_unix: float = 0.0


def cert_sha256(cert_pem: str | bytes) -> str:
    """The hex sha256 of a PEM certificate's DER form: how a certificate is recognised (and revoked)."""
    text = cert_pem.decode("ascii") if isinstance(cert_pem, bytes) else cert_pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text)).hexdigest()


def render_registry(clients: list[Provisioned]) -> str:
    """The TOML text of a clients file (what ``read_registry`` reads back)."""
    lines = ["# flora provisioned clients: sha256 digests only (written by flora-admin provision)", ""]
    for client in sorted(clients, key=lambda c: c.name):
        lines += [f'[clients."{client.name}"]', f'token_sha256 = "{client.token_sha256}"',
                  f'cert_sha256 = "{client.cert_sha256}"']
        if client.removed is not None:
            lines += [f"removed = {json.dumps(client.removed, ensure_ascii=False)}", f"removed_unix = {client.removed_unix!r}"]
        lines.append("")
    return "\n".join(lines)


def mark_removal(path: Path, name: str, reason: str | None, now: float = 0.0) -> bool:
    """Mark ``name`` removed (``reason``) or re-admitted (None) in a clients file, atomically.

    Returns False when the file has no such client (nothing written).
    """
    clients = read_registry(path)
    if name not in clients:
        return False
    clients[name] = replace(clients[name], removed=reason, removed_unix=now if reason is not None else 0.0)
    write_atomic(path, render_registry(list(clients.values())).encode("utf-8"), mode=path.stat().st_mode & 0o777)
    return True


def read_registry(path: Path) -> dict[str, Provisioned]:
    """The clients of a clients file, by name; every malformed entry is named."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RegistryError(f"client registry {path}: {err}") from None
    entries = data.get("clients", {})
    if not isinstance(entries, dict):
        raise RegistryError(f"client registry {path}: [clients] must be a table of client names")
    clients = {}
    for name, entry in entries.items():
        entry = entry if isinstance(entry, dict) else {}
        token, cert = entry.get("token_sha256", ""), entry.get("cert_sha256", "")
        removed, removed_unix = entry.get("removed"), entry.get("removed_unix", 0.0)
        if (not _NAME.fullmatch(name) or not _HEX64.fullmatch(token) or not (cert == "" or _HEX64.fullmatch(cert))
                or not isinstance(removed, (str, type(None))) or not isinstance(removed_unix, (int, float))):
            raise RegistryError(
                f"client registry {path}: entry {name[:80]!r} needs a name matching ^[A-Za-z0-9._-]{{1,64}}$, "
                "token_sha256 (64 hex digits), an optional cert_sha256 (64 hex digits) and, for a removed client, "
                "removed (the reason, text) and removed_unix (a number)")
        clients[name] = Provisioned(name, token, cert, removed, float(removed_unix))
    return clients


class Registry:
    """A clients file, re-read when it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._clients: dict[str, Provisioned] = {}
        self._tokens: dict[str, Provisioned] = {}
        self._load()

    def _load(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError as err:
            raise RegistryError(f"client registry {self.path}: {err.strerror}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._clients = read_registry(self.path)
            self._tokens = {c.token_sha256: c for c in self._clients.values()}
            self._stamp = stamp

    def refresh(self) -> None:
        """Re-read the file if it changed; a broken or missing file keeps the last good contents."""
        try:
            self._load()
        except RegistryError as err:
            log.warning("%s; keeping the %d clients read before", err, len(self._clients))

    def by_token(self, digest: str) -> Provisioned | None:
        """The provisioned client whose token has this sha256, if any."""
        return self._tokens.get(digest)

    def get(self, name: str) -> Provisioned | None:
        """The provisioned client of this name, if any."""
        return self._clients.get(name)

    def mark(self, name: str, reason: str | None, now: float = 0.0) -> bool:
        """Record a removal (or, with ``reason`` None, a re-admission) of ``name`` in the file."""
        written = mark_removal(self.path, name, reason, now)
        self.refresh()
        return written

    def names(self) -> list[str]:
        """Every provisioned client name, sorted."""
        return sorted(self._clients)
