"""The docker-compose files are checked statically: no container engine runs here or in CI.

Every command, flag and environment variable a service uses goes through the real parsers and
settings loaders (the setup job's ``flora-admin provision`` even runs, into a temporary folder
standing in for the shared volume), so a renamed flag, a setting out of range or a path that
the kits do not provide fails here, not on a user's cluster. (The compose demo is run for real
by ../shared/tools/compose-check.sh; see README.)
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from flora.client.cli import build_parser as client_parser
from flora.client.config import ENV_PREFIX as CLIENT_ENV, ClientSettings
from flora.common.settings import load_settings
from flora.server.admin.cli import build_parser as admin_parser, main as admin
from flora.server.admin.connect import ENV_PREFIX as ADMIN_ENV, OperatorSettings
from flora.server.cli import build_parser as server_parser
from flora.server.config import ENV_PREFIX as SERVER_ENV, ServerSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
FILES = ("docker-compose.yml", "compose.server.yml", "compose.client.yml")
COMPOSE = {name: yaml.safe_load((DEPLOY / name).read_text()) for name in FILES}
DEMO = COMPOSE["docker-compose.yml"]["services"]
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}")


def resolve(value: object) -> str:
    """Compose's ${VAR:-default} interpolation with nothing set: every default."""
    return _VARIABLE.sub(lambda m: m["default"] or "", str(value))


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return [resolve(a) for a in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def environment(service: dict, prefix: str = "") -> dict[str, str]:
    return {k: resolve(v) for k, v in (service.get("environment") or {}).items() if k.startswith(prefix)}


def relocate(text: str, root: Path, mounts: dict[str, Path] | None = None) -> str:
    """Container paths on real folders: /shared (the demo's volume) under ``root``, or ``mounts``."""
    for mount, target in (mounts or {"/shared": root / "shared"}).items():
        if f"{mount}/" in text:
            prefix, path = text.split(f"{mount}/", 1)
            return prefix + str(target / path)
    return text


@pytest.fixture()
def shared(tmp_path: Path) -> Path:
    """The demo's shared volume as its setup job leaves it: kits (really provisioned) and data."""
    setup = " ".join(command(DEMO["setup"]))
    provision = re.search(r"flora-admin (provision [^;&]*)", setup)[1]
    assert admin([relocate(a, tmp_path) for a in shlex.split(provision)]) == 0
    for k in range(3):
        (tmp_path / "shared" / "data" / f"client_{k}.json").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shared" / "data" / f"client_{k}.json").write_text("[]")
    (tmp_path / "shared" / "data" / "validation.json").write_text("[]")
    return tmp_path


def split_kits(root: Path) -> Path:
    """Kits for the split layout, provisioned as the README says (--install-dir /kit), mounted at /kit."""
    out = root / "kits"
    assert admin(["provision", "--project", "p", "--server", "flora.example.org", "--clients", "client", "--out", str(out),
                  "--install-dir", "/kit"]) == 0
    return out


def load_server(service: dict, root: Path) -> ServerSettings:
    flags = vars(server_parser().parse_args([relocate(a, root) for a in command(service)[1:]]))
    config = flags.pop("config")
    flags.pop("print_config")
    return load_settings(ServerSettings, config_file=config, env_prefix=SERVER_ENV, flags=flags,
                         environ={k: relocate(v, root) for k, v in environment(service, SERVER_ENV).items()})


def test_the_demo_has_a_server_and_heterogeneous_clients():
    clients = [s for s in DEMO.values() if command(s)[0] == "flora-client"]
    ranks = {arg.split("=", 1)[1] for s in clients for arg in command(s) if arg.startswith("--rank=")}
    assert [command(s)[0] for s in DEMO.values()].count("flora-server") == 1
    assert len(clients) >= 3 and len(ranks) >= 3


@pytest.mark.parametrize("file", FILES)
def test_the_image_is_built_by_one_service_and_used_by_all(file):
    compose = COMPOSE[file]["services"]
    builders = [name for name, s in compose.items() if "build" in s]
    assert len(builders) == 1, f"{file}: every service with build: builds its own copy in parallel"
    build = compose[builders[0]]["build"]
    assert build["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / build["context"]).resolve() == ROOT
    assert {s["image"] for s in compose.values()} == {"flora:latest"}


@pytest.mark.parametrize("file", FILES)
def test_every_named_volume_is_declared(file):
    declared = set(COMPOSE[file].get("volumes") or {})
    for name, service in COMPOSE[file]["services"].items():
        for volume in service.get("volumes", []):
            source = resolve(volume).split(":")[0]
            assert source.startswith((".", "/")) or source in declared, f"{file} {name}: undeclared volume {volume}"


def test_demo_server_settings_are_valid_and_it_exits_after_the_run(shared):
    settings = load_server(DEMO["server"], shared)
    assert settings.host == "0.0.0.0" and settings.tls_cert is not None and settings.tls_client_ca is not None
    assert settings.client_registry is not None and settings.enrollment_token is None
    assert settings.min_clients == sum(command(s)[0] == "flora-client" for s in DEMO.values())
    assert settings.exit_after_finish_s is not None and 10 <= settings.exit_after_finish_s <= 90
    assert 1 <= settings.local_steps <= 50, "demo-sized rounds"
    assert settings.rounds == 3 and settings.checkpoint_every == 1


@pytest.mark.parametrize("name", [n for n, s in DEMO.items() if command(s)[0] == "flora-client"])
def test_demo_client_settings_are_valid(name, shared):
    service = DEMO[name]
    flags = vars(client_parser().parse_args([relocate(a, shared) for a in command(service)[1:]]))
    config = flags.pop("config")
    flags.pop("print_config")
    settings = load_settings(ClientSettings, config_file=config, env_prefix=CLIENT_ENV, flags=flags,
                             environ=environment(service, CLIENT_ENV))
    assert settings.name == name and settings.server == "server:50051"
    assert settings.uses_tls and settings.tls_cert is not None and settings.token is not None
    assert str(settings.state_dir) == "/state"
    assert settings.threads == 1, "one torch thread per client container by default"
    assert service["depends_on"]["server"]["condition"] == "service_healthy"


def test_health_checks_use_the_grpc_health_service_over_the_kits(shared, tmp_path):
    kits = split_kits(tmp_path / "split")
    for file, mounts in (("docker-compose.yml", {"/shared": shared / "shared"}), ("compose.server.yml", {"/kit": kits / "server"})):
        test = COMPOSE[file]["services"]["server"]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "flora-admin", "health"]
        args = vars(admin_parser().parse_args(["health", *[relocate(a, shared, mounts) for a in test[3:]]]))
        flags = {k: v for k, v in args.items() if k in OperatorSettings.model_fields}
        settings = load_settings(OperatorSettings, config_file=args["config"], env_prefix=ADMIN_ENV, flags=flags, environ={})
        assert settings.uses_tls and settings.tls_cert is not None and settings.server == "localhost:50051"


def test_split_server_and_client_files_load_with_kits_made_for_them(tmp_path):
    kits = split_kits(tmp_path)
    server = COMPOSE["compose.server.yml"]["services"]["server"]
    flags = vars(server_parser().parse_args(command(server)[1:]))
    config = flags.pop("config")
    flags.pop("print_config")
    text = (kits / "server" / config.name).read_text()
    assert '"/kit/server.pem"' in text, "kits made with --install-dir /kit"
    (tmp_path / "server.toml").write_text(text.replace("/kit/", f"{kits / 'server'}/"))
    settings = load_settings(ServerSettings, config_file=tmp_path / "server.toml", env_prefix=SERVER_ENV, flags=flags,
                             environ=environment(server, SERVER_ENV))
    assert settings.tls_client_ca is not None and settings.client_registry is not None
    assert settings.exit_after_finish_s is None, "a real deployment serves until stopped"
    assert settings.metrics_port == 9100 and any(p.endswith(":9100") for p in map(resolve, server["ports"]))
    client = COMPOSE["compose.client.yml"]["services"]["client"]
    text = (kits / "clients" / "client" / "client.toml").read_text()
    (tmp_path / "client.toml").write_text(text.replace("/kit/", f"{kits / 'clients' / 'client'}/"))
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("")
    env = {k: relocate(v, tmp_path, {"/data": data.parent}) for k, v in environment(client, CLIENT_ENV).items()}
    flags = vars(client_parser().parse_args([a for a in command(client)[1:] if not a.startswith("--config")]))
    flags.pop("config"), flags.pop("print_config")
    settings = load_settings(ClientSettings, config_file=tmp_path / "client.toml", env_prefix=CLIENT_ENV, flags=flags, environ=env)
    assert settings.server == "flora.example.org:50051" and settings.data == [str(data)] and settings.uses_tls
    assert settings.name == "client" and settings.tls_cert is not None


def test_dockerfile_copies_every_package_folder_and_owns_every_mount_point():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in package_dirs.values():
        assert any(folder == c or folder.startswith(c + "/") for c in copied), f"the image lacks {folder}"
    mounts = {resolve(v).split(":")[1] for c in COMPOSE.values() for s in c["services"].values()
              for v in s.get("volumes", []) if not resolve(v).startswith((".", "/"))}  # named volumes, not bind mounts
    chown = next(line for line in dockerfile.splitlines() if "chown flora" in line)
    for mount in mounts:
        assert mount in dockerfile and mount in chown, f"{mount} must exist in the image owned by flora (Docker Engine volumes)"


def test_dockerignore_keeps_history_venvs_and_runs_out_of_the_build():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    assert {".git", "**/.venv", "flora-demo-run", "kits", "bench/results"} <= ignored
    copied = [line.split()[1] for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    assert not any(c in ignored for c in copied)
