"""The docker-compose demo is checked statically: no Docker engine runs here or in CI.

Every command and environment variable a service uses is fed through the real settings
loaders, so a renamed flag or a setting out of range fails here, not on a user's cluster.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from flora.client.cli import build_parser as client_parser
from flora.client.config import ENV_PREFIX as CLIENT_ENV, ClientSettings
from flora.common.settings import load_settings
from flora.server.cli import build_parser as server_parser
from flora.server.config import ENV_PREFIX as SERVER_ENV, ServerSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def environment(service: dict, prefix: str) -> dict[str, str]:
    """The service's flora variables with compose's ${VAR:-default} resolved to the default."""
    env = {}
    for key, value in (service.get("environment") or {}).items():
        value = str(value)
        if value.startswith("${") and ":-" in value:
            value = value[value.index(":-") + 2 : -1]
        if key.startswith(prefix):
            env[key] = value
    return env


def relocate(args: list[str], env: dict[str, str], root: Path) -> tuple[list[str], dict[str, str]]:
    """Point /shared paths at real files under ``root`` (client settings require files to exist)."""
    def move(text: str) -> str:
        if "/shared/" not in text:
            return text
        prefix, path = text.split("/shared/", 1)
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
        return prefix + str(target)

    return [move(a) for a in args], {k: move(v) for k, v in env.items()}


def test_compose_has_a_server_and_heterogeneous_clients():
    clients = [s for s in SERVICES.values() if command(s)[0] == "flora-client"]
    ranks = {arg.split("=", 1)[1] for s in clients for arg in command(s) if arg.startswith("--rank=")}
    assert [command(s)[0] for s in SERVICES.values()].count("flora-server") == 1
    assert len(clients) >= 3 and len(ranks) >= 3
    for name, service in SERVICES.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert (DEPLOY.parent / service["build"]["context"].replace("..", ".")).is_dir()


def test_every_volume_is_declared():
    declared = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in declared, f"{name}: undeclared volume {volume}"


def test_server_service_settings_are_valid():
    service = next(s for s in SERVICES.values() if command(s)[0] == "flora-server")
    flags = vars(server_parser().parse_args(command(service)[1:]))
    flags.pop("config"), flags.pop("print_config")
    settings = load_settings(ServerSettings, env_prefix=SERVER_ENV, flags=flags, environ=environment(service, SERVER_ENV))
    assert settings.host == "0.0.0.0" and settings.tls_cert is not None, "beyond loopback the server must use TLS"
    assert settings.enrollment_token is not None, "a networked server must require an enrolment token"
    assert settings.min_clients == sum(command(s)[0] == "flora-client" for s in SERVICES.values())


@pytest.mark.parametrize("name", [n for n, s in SERVICES.items() if command(s)[0] == "flora-client"])
def test_client_service_settings_are_valid(name, tmp_path):
    service = SERVICES[name]
    args, env = relocate(command(service)[1:], environment(service, CLIENT_ENV), tmp_path)
    flags = vars(client_parser().parse_args(args))
    flags.pop("config"), flags.pop("print_config")
    settings = load_settings(ClientSettings, env_prefix=CLIENT_ENV, flags=flags, environ=env)
    assert settings.server == "server:50051" and settings.uses_tls
    assert settings.token is not None


def test_setup_service_writes_what_the_others_read():
    setup = " ".join(command(SERVICES["setup"]))
    assert "gen-certs.sh /shared/certs server" in setup and "--write-data /shared/data" in setup
    assert (DEPLOY / "gen-certs.sh").exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_gen_certs_makes_a_server_certificate_for_the_service_name(tmp_path):
    subprocess.run(["sh", str(DEPLOY / "gen-certs.sh"), str(tmp_path), "server"], check=True, capture_output=True)
    text = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-text"], check=True, capture_output=True, text=True
    ).stdout
    assert "DNS:server" in text
    subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "server.pem")], check=True, capture_output=True)


def test_dockerfile_copies_every_package_folder():
    copied = [line.split()[1] for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    package_dirs = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in package_dirs.values():
        assert any(folder == c or folder.startswith(c + "/") for c in copied), f"the image lacks {folder}"
