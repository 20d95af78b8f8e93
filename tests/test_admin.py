"""flora-admin without a server: kits on disk, the registry, the console's text, the report."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from flora.client.config import ENV_PREFIX as CLIENT_ENV, ClientSettings
from flora.common.settings import load_settings
from flora.server.admin import console
from flora.server.admin.cli import main as admin
from flora.server.admin.pki import common_name
from flora.server.admin.report import write_report
from flora.server.auth import token_digest
from flora.server.config import ServerSettings
from flora.server.registry import Registry, RegistryError, cert_sha256, read_registry
from flora.v1 import coordinator_pb2 as pb

KEYS = ("ca/ca-key.pem", "server/server-key.pem", "operator/operator-key.pem", "clients/a/client-key.pem",
        "clients/b/client-key.pem")


@pytest.fixture()
def kits(tmp_path: Path) -> Path:
    out = tmp_path / "kits"
    assert admin(["provision", "--project", "p", "--server", "flora.example.org,10.0.0.5", "--clients", "a,b",
                  "--out", str(out)]) == 0
    return out


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def signed_by(child: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        ca.public_key().verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(child.signature_hash_algorithm))
    except Exception:
        return False
    return True


def test_keys_and_secrets_are_owner_only(kits):
    for relative in (*KEYS, "clients/a/client.toml", "server/server.toml", "operator/operator.toml"):
        assert stat.S_IMODE((kits / relative).stat().st_mode) == 0o600, relative
    assert stat.S_IMODE((kits / "clients/a/ca.pem").stat().st_mode) == 0o644


def test_certificates_chain_to_the_ca_with_the_right_names(kits):
    ca = cert(kits / "ca/ca.pem")
    server = cert(kits / "server/server.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["flora.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    client = cert(kits / "clients/a/client.pem")
    assert common_name((kits / "clients/a/client.pem").read_bytes()) == "a"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert signed_by(server, ca) and signed_by(client, ca)


def test_configs_load_through_the_real_settings(kits, tmp_path):
    data = tmp_path / "train.json"
    data.write_text("[]")
    client = load_settings(ClientSettings, config_file=kits / "clients/a/client.toml", env_prefix=CLIENT_ENV,
                           flags={"data": str(data)}, environ={})
    assert client.server == "flora.example.org:50051" and client.name == "a" and client.uses_tls
    assert client.tls_cert is not None and client.tls_key is not None
    server = load_settings(ServerSettings, config_file=kits / "server/server.toml", environ={})
    assert server.tls_client_ca is not None and server.operator_token is not None
    registry = read_registry(server.client_registry)
    assert registry["a"].token_sha256 == token_digest(client.token.get_secret_value())
    assert registry["a"].cert_sha256 == cert_sha256((kits / "clients/a/client.pem").read_bytes())


def test_rerunning_never_overwrites_a_key_without_force(kits, capsys):
    before = {k: (kits / k).read_bytes() for k in KEYS}
    assert admin(["provision", "--project", "p", "--server", "h", "--clients", "a,b", "--out", str(kits)]) == 2
    assert "--force" in capsys.readouterr().err
    assert admin(["provision", "--out", str(kits), "--add-client", "a"]) == 2
    assert {k: (kits / k).read_bytes() for k in KEYS} == before
    assert admin(["provision", "--project", "p", "--server", "h", "--clients", "a,b", "--out", str(kits), "--force"]) == 0
    assert all((kits / k).read_bytes() != before[k] for k in KEYS)


def test_add_client_extends_the_project_with_the_same_ca(kits):
    registry = Registry(kits / "server/clients.toml")
    assert registry.names() == ["a", "b"]
    assert admin(["provision", "--out", str(kits), "--add-client", "c,d"]) == 0
    assert signed_by(cert(kits / "clients/c/client.pem"), cert(kits / "ca/ca.pem"))
    registry.refresh()  # a running server re-reads the changed file
    assert registry.names() == ["a", "b", "c", "d"]
    token = tomllib.loads((kits / "clients/c/client.toml").read_text())["token"]
    assert registry.by_token(token_digest(token)).name == "c"


@pytest.mark.parametrize("argv, message", [
    (["--project", "p", "--server", "h", "--clients", "a,a"], "unique"),
    (["--project", "p", "--server", "h", "--clients", "a/../b"], "must match"),
    (["--project", "p", "--clients", "a"], "--server"),
    (["--add-client", "x"], "not a provisioned project"),
    (["--project", "p", "--server", "h", "--clients", "a", "--days", "0"], "--days 0: certificates must be valid"),
    (["--project", "p", "--server", "h", "--clients", "a", "--port", "0"], "--port 0 is outside 1..65535"),
])
def test_bad_provisioning_requests_are_refused_with_nothing_written(tmp_path, capsys, argv, message):
    out = tmp_path / "kits"
    assert admin(["provision", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(out.rglob("*.pem")) if out.exists() else True


def test_a_broken_registry_is_named(tmp_path):
    path = tmp_path / "clients.toml"
    path.write_text('[clients."a"]\ntoken_sha256 = "not-hex"\n')
    with pytest.raises(RegistryError, match="'a'"):
        Registry(path)


def test_a_removal_marked_in_the_registry_survives_adding_clients_and_a_readmission_clears_it(kits):
    path = kits / "server" / "clients.toml"
    mode = path.stat().st_mode & 0o777
    reason = 'said "bye"\nand left \u00e9\U0001f600'  # quotes, a newline, non-ASCII: TOML must read it back
    assert Registry(path).mark("a", reason, 12.5)
    assert (read_registry(path)["a"].removed, read_registry(path)["a"].removed_unix) == (reason, 12.5)
    assert path.stat().st_mode & 0o777 == mode
    assert admin(["provision", "--out", str(kits), "--add-client", "c"]) == 0
    assert read_registry(path)["a"].removed == reason and read_registry(path)["c"].removed is None
    assert not Registry(path).mark("nobody", "x")
    assert Registry(path).mark("a", None)
    assert read_registry(path)["a"].removed is None and "removed" not in path.read_text()


def history_file(state: Path) -> None:
    state.mkdir()
    records = [{"round": 0, "validation_loss": 5.0, "committed_unix": 100.0}] + [
        {"round": r, "clients": [{"name": "a", "rank": 8}, {"name": "b", "rank": 4}], "num_clients": 2,
         "train_loss": 5.0 - r, "validation_loss": 5.0 - r / 2, "bytes_in": 1000 * r, "bytes_out": 2000 * r,
         "committed_unix": 100.0 + 10 * r, "checkpoint": f"checkpoints/v{r:06d}" if r == 3 else None}
        for r in (1, 2, 3)]
    (state / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_writes_a_png_and_a_markdown_summary(tmp_path):
    history_file(tmp_path / "state")
    report = write_report(tmp_path / "state")
    assert report.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.png.stat().st_size > 10_000
    text = report.markdown.read_text()
    assert "5.0000 -> 3.5000" in text and "checkpoints/v000003" in text and "report.png" in text


def test_report_of_an_empty_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.db").touch()  # a server started, nothing committed yet
    assert admin(["report", str(tmp_path / "state")]) == 2
    assert "no committed round" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["kits", "missing"])
def test_report_on_a_folder_that_is_not_a_state_dir_says_so_and_writes_nothing(tmp_path, capsys, folder):
    (tmp_path / "kits").mkdir()
    assert admin(["report", str(tmp_path / folder)]) == 2
    assert f"{tmp_path / folder} is not a flora-server state directory" in capsys.readouterr().err
    assert not (tmp_path / folder / "report.md").exists()


def test_report_says_what_its_seconds_include_and_ticks_whole_rounds_and_clients(tmp_path):
    history_file(tmp_path / "state")
    report = write_report(tmp_path / "state")
    assert "any time the server was down" in report.markdown.read_text()
    import matplotlib.pyplot as plt

    from flora.server.admin import report as module

    drawn, real_subplots = [], plt.subplots

    def subplots(*args, **kwargs):  # keep the figure draw() makes, to read its ticks
        drawn.append(real_subplots(*args, **kwargs))
        return drawn[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt, "subplots", subplots)
        patch.setattr(plt, "close", lambda figure: None)
        module.draw(module.read_history(tmp_path / "state" / "history.jsonl"), tmp_path / "r.png")
    axes = drawn[0][1]
    for axis in axes:
        assert all(float(t).is_integer() for t in axis.get_xticks())
    assert all(float(t).is_integer() for t in axes[2].get_yticks())


def test_console_text_names_round_deadline_clients_and_losses():
    status = pb.StatusReply(state="running", global_version=1)
    status.run.rounds, status.run.run_id = 3, "r1"
    status.round.CopyFrom(pb.RoundStatus(round=2, state="open", selected=["x", "y", "z"], submitted=["x"],
                                         deadline_unix_ms=1_000_000, quorum=2, attempt=2))
    status.clients.extend([
        pb.ClientStatus(client_id="x", client_name="a", state="submitted", rank=8, bytes_submitted=2_000_000),
        pb.ClientStatus(client_id="y", client_name="b", state="training", rank=4),
        pb.ClientStatus(client_id="z", client_name="c", state="left", rank=4)])
    status.recent_rounds.append(pb.RoundSummary(round=1, num_clients=3, train_loss=4.5, validation_loss=float("nan")))
    text = console.render_plain(status, now=2000.0)  # past the deadline: b is late
    assert "round 2 (attempt 2) open: 1/3 updates, quorum 2" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "uploaded" in rows["a"] and "late" in rows["b"] and "left" in rows["c"] and "| 2 " in rows["a"]
    assert "4.5" in text
    assert console.as_json(status)["round"]["quorum"] == 2


def test_watch_prints_one_snapshot_per_refresh_off_a_terminal_and_draws_tables_on_one():
    import io

    from rich.console import Console

    replies = iter([pb.StatusReply(state="waiting_for_clients"), pb.StatusReply(state="finished", global_version=3)])
    out = io.StringIO()
    console.watch(lambda: next(replies), out, interval=0, terminal=False, iterations=2)
    text = out.getvalue()
    assert text.count("--- ") == 2 and "(waiting_for_clients)" in text and "(finished): version 3" in text
    drawn = io.StringIO()
    status = pb.StatusReply(state="running", clients=[pb.ClientStatus(client_name="a", state="training", rank=8)])
    Console(file=drawn, width=120).print(console.render_rich(status, now=0.0))
    assert "clients" in drawn.getvalue() and "training" in drawn.getvalue()


def test_watch_keeps_watching_while_the_server_is_unreachable_and_resumes():
    import io

    import grpc

    class Unreachable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "failed to connect to all addresses"

    def fetch():
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    replies = iter([pb.StatusReply(state="running", global_version=1), Unreachable(), Unreachable(),
                    pb.StatusReply(state="finished", global_version=3)])
    out = io.StringIO()
    console.watch(fetch, out, interval=0, terminal=False, iterations=4)
    snapshots = out.getvalue().split("--- ")[1:]
    assert "(running): version 1" in snapshots[0]
    assert all("server unreachable since " in s and "UNAVAILABLE" in s for s in snapshots[1:3])
    assert snapshots[1].split("since ")[1][:8] == snapshots[2].split("since ")[1][:8]  # since the first failure
    assert "(finished): version 3" in snapshots[3]

    class Refused(Unreachable):
        def code(self):
            return grpc.StatusCode.UNAUTHENTICATED

    replies = iter([Refused()])
    with pytest.raises(grpc.RpcError):  # a wrong token is not waited out
        console.watch(fetch, io.StringIO(), interval=0, terminal=False, iterations=2)


def test_a_waiting_round_short_of_clients_says_what_it_needs():
    status = pb.StatusReply(state="waiting_for_clients", global_version=2)
    status.round.CopyFrom(pb.RoundStatus(round=3, state="waiting", min_clients=3, available_clients=2))
    assert "round 3 waiting: needs 3 connected clients, has 2" in console.render_plain(status, now=0.0)


def test_report_shows_each_secure_rounds_survivors_recoveries_and_the_cost_of_each_stage(tmp_path):
    history_file(tmp_path / "state")
    path = tmp_path / "state" / "history.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records[1:]:
        record["secure_aggregation"] = record["round"] != 2  # round 2 plain: a "no" row
    records[1]["secure"] = {"survivors": 2, "dropped": 1, "dropouts_recovered": 1,
                            "bytes_up": {"advertise": 300, "share": 2_000_000, "mask1": 8_000_000},
                            "bytes_down": {"share": 1_000_000, "mask1": 4_500_000}, "seconds": {"share": 0.5, "mask1": 2.25}}
    records[3]["secure"] = {"survivors": 2, "dropped": 0, "dropouts_recovered": 0, "bytes_up": {"mask1": 1_000_000},
                            "bytes_down": {}, "seconds": {"mask1": 1.0}}
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(tmp_path / "state", require_png=False).markdown.read_text()
    table = text[text.index("Secure aggregation"):]
    header = next(line for line in table.splitlines() if line.startswith("| round"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "round", "secure", "survivors", "dropouts recovered", "advertise", "share", "mask1"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[4:7]]
    assert rows[0] == ["1", "yes", "2", "1", "0.0003 / 0 / 0.00s", "2 / 1 / 0.50s", "8 / 4.5 / 2.25s"]
    assert rows[1][:3] == ["2", "no", "-"]
    assert rows[2] == ["3", "yes", "2", "0", "0 / 0 / 0.00s", "0 / 0 / 0.00s", "1 / 0 / 1.00s"]


def test_report_of_a_plain_run_has_no_secure_section(tmp_path):
    history_file(tmp_path / "state")
    assert "Secure aggregation" not in write_report(tmp_path / "state", require_png=False).markdown.read_text()
