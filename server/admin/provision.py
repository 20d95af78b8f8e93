"""Startup kits: one folder per party of a project, written once, keys readable by their owner only.

``provision`` makes a project: a CA, the server's kit (certificate for the hosts clients dial,
``server.toml``, the registry of client token and certificate digests), an operator kit (a
client certificate and the operator token, for ``flora-admin status``) and one kit per data
holder (CA certificate, its certificate and key, its token, a ready ``client.toml``).
``add_clients`` extends an existing project with the same CA. Nothing is ever overwritten
without ``force``: a re-run that would replace a key stops before writing anything.

    OUT/project.toml            project name, server hosts and port, install dir
    OUT/ca/ca.pem, ca-key.pem   the CA (keep ca-key.pem offline: it signs new kits)
    OUT/server/                 server.pem, server-key.pem, ca.pem, clients.toml, server.toml
    OUT/operator/               operator.pem, operator-key.pem, ca.pem, operator.toml
    OUT/clients/<name>/         client.pem, client-key.pem, ca.pem, client.toml
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from flora.server.admin.pki import KeyPair, client_cert, make_ca, server_cert
from flora.server.auth import new_token, token_digest
from flora.server.registry import Provisioned, cert_sha256, read_registry, render_registry

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
OPERATOR = "operator"
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


class ProvisionError(ValueError):
    """A provisioning request that cannot be carried out; nothing was written."""


@dataclass(frozen=True)
class Project:
    """What every kit of a project agrees on."""

    name: str
    hosts: list[str]
    port: int
    install_dir: str  # where each server/client kit folder will be on its host ("" = where it is written)
    days: int


def _toml(values: dict) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, str) and value.startswith("#"):
            lines.append(value)
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _kit_path(project: Project, out: Path, kit: Path, file: str) -> str:
    """How a config refers to a file of its own kit: under install_dir when given."""
    if project.install_dir:
        return f"{project.install_dir.rstrip('/')}/{file}"
    return str((out / kit / file).resolve())


def _address(project: Project) -> str:
    host = project.hosts[0]
    return f"[{host}]:{project.port}" if ":" in host else f"{host}:{project.port}"


def _add_kit(files: dict, kit: Path, ca: KeyPair, role: str, pair: KeyPair, config: dict) -> None:
    """One kit's files: the CA certificate, ``<role>.pem``, ``<role>-key.pem``, ``<role>.toml``."""
    files[kit / "ca.pem"] = (ca.cert_pem, PUBLIC_MODE)
    files[kit / f"{role}.pem"] = (pair.cert_pem, PUBLIC_MODE)
    files[kit / f"{role}-key.pem"] = (pair.key_pem, SECRET_MODE)
    files[kit / f"{role}.toml"] = (_toml(config).encode(), SECRET_MODE)  # holds a token


def _tls(project: Project, out: Path, kit: Path, role: str) -> dict[str, str]:
    return {"tls_ca": _kit_path(project, out, kit, "ca.pem"), "tls_cert": _kit_path(project, out, kit, f"{role}.pem"),
            "tls_key": _kit_path(project, out, kit, f"{role}-key.pem")}


def _client_kit(project: Project, out: Path, ca: KeyPair, name: str, files: dict) -> Provisioned:
    kit = Path("clients") / name
    pair, token = client_cert(ca, project.name, name, project.days), new_token()
    _add_kit(files, kit, ca, "client", pair, {
        "c": f"# startup kit of {name!r} in flora project {project.name!r}: flora-client --config client.toml --data FILE",
        "server": _address(project), "name": name, "token": token, **_tls(project, out, kit, "client"),
        "state_dir": _kit_path(project, out, kit, "state"),
    })
    return Provisioned(name, token_digest(token), cert_sha256(pair.cert_pem))


def _server_kit(project: Project, out: Path, ca: KeyPair, files: dict, operator_token: str) -> None:
    kit = Path("server")
    tls = _tls(project, out, kit, "server")
    _add_kit(files, kit, ca, "server", server_cert(ca, project.name, project.hosts, project.days), {
        "c": f"# flora-server kit of project {project.name!r}: flora-server --config server.toml [--state-dir DIR ...]",
        "host": "0.0.0.0", "port": project.port, "tls_cert": tls["tls_cert"], "tls_key": tls["tls_key"],
        "tls_client_ca": tls["tls_ca"], "client_registry": _kit_path(project, out, kit, "clients.toml"),
        "operator_token": operator_token,
    })


def _operator_kit(project: Project, out: Path, ca: KeyPair, files: dict) -> str:
    """The operator's kit stays where it is written (install_dir is for the kits that travel)."""
    kit, project = Path(OPERATOR), replace(project, install_dir="")
    token = new_token()
    _add_kit(files, kit, ca, OPERATOR, client_cert(ca, project.name, OPERATOR, project.days), {
        "c": f"# operator kit of flora project {project.name!r}: flora-admin status --config operator.toml",
        "server": _address(project), "token": token, **_tls(project, out, kit, OPERATOR),
    })
    return token


def _check_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    bad = [n for n in names if not NAME.fullmatch(n) or n == OPERATOR]
    if bad:
        raise ProvisionError(f"client name {bad[0][:80]!r} must match ^[A-Za-z0-9._-]{{1,64}}$ and not be {OPERATOR!r}")
    if len(set(names)) != len(names):
        raise ProvisionError(f"client names must be unique, got {','.join(names)}")
    if not names:
        raise ProvisionError("give at least one client name")
    return names


def _write(out: Path, files: dict[Path, tuple[bytes, int]], force: bool) -> list[Path]:
    """Write every file (atomically, with its mode from the start), refusing to replace any without force."""
    existing = [out / p for p in files if (out / p).exists() and not p.name.endswith(("ca.pem", "clients.toml"))]
    if existing and not force:
        raise ProvisionError(
            f"{existing[0]} exists (and {len(existing) - 1} more files): nothing written; pass --force to replace "
            "keys and tokens (every affected kit must then be handed out again)")
    written = []
    for relative, (data, mode) in sorted(files.items()):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # whatever the umask
        os.replace(tmp, path)
        written.append(path)
    return written


def provision(project: Project, clients: list[str], out: Path, force: bool = False) -> list[Path]:
    """A new project: CA, server, operator and client kits. Returns the files written."""
    clients = _check_names(clients)
    if not project.hosts or any(not h for h in project.hosts):
        raise ProvisionError("--server needs at least one host name or address clients dial")
    if (out / "ca" / "ca-key.pem").exists() and not force:
        raise ProvisionError(
            f"{out} already holds a project (ca/ca-key.pem): nothing written; use --add-client NAME to extend it, "
            "or --force to make a new CA (every kit must then be handed out again)")
    ca = make_ca(project.name, project.days)
    files: dict[Path, tuple[bytes, int]] = {
        Path("ca/ca.pem"): (ca.cert_pem, PUBLIC_MODE), Path("ca/ca-key.pem"): (ca.key_pem, SECRET_MODE),
        Path("project.toml"): (_toml({"project": project.name, "hosts": project.hosts, "port": project.port,
                                      "install_dir": project.install_dir, "days": project.days}).encode(), PUBLIC_MODE),
    }
    _server_kit(project, out, ca, files, _operator_kit(project, out, ca, files))
    entries = [_client_kit(project, out, ca, name, files) for name in clients]
    files[Path("server/clients.toml")] = (render_registry(entries).encode(), PUBLIC_MODE)
    return _write(out, files, force)


def load_project(out: Path) -> tuple[Project, KeyPair]:
    """An existing project's settings and CA, to sign more kits with."""
    try:
        meta = tomllib.loads((out / "project.toml").read_text())
        ca = KeyPair((out / "ca" / "ca.pem").read_bytes(), (out / "ca" / "ca-key.pem").read_bytes())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ProvisionError(f"{out} is not a provisioned project (project.toml, ca/ca.pem, ca/ca-key.pem): {err}") from None
    return Project(meta["project"], list(meta["hosts"]), int(meta["port"]), meta.get("install_dir", ""), int(meta["days"])), ca


def add_clients(out: Path, clients: list[str], force: bool = False) -> list[Path]:
    """More client kits for an existing project, signed by its CA, added to the server's registry."""
    clients = _check_names(clients)
    project, ca = load_project(out)
    registry_path = out / "server" / "clients.toml"
    registry = read_registry(registry_path) if registry_path.exists() else {}
    taken = [n for n in clients if n in registry]
    if taken and not force:
        raise ProvisionError(f"client {taken[0]!r} is already provisioned: nothing written; --force issues it a new key and token")
    files: dict[Path, tuple[bytes, int]] = {}
    for name in clients:
        registry[name] = _client_kit(project, out, ca, name, files)
    files[Path("server/clients.toml")] = (render_registry(list(registry.values())).encode(), PUBLIC_MODE)
    return _write(out, files, force)
