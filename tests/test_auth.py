"""Who may call what: enrolment, provisioned and operator tokens, and revocation (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flora.server.auth import Credentials, token_digest
from flora.server.errors import Unauthenticated
from flora.server.registry import Provisioned, Registry, render_registry

CALL = "/flora.v1.Coordinator/"


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    path = tmp_path / "clients.toml"
    path.write_text(render_registry([Provisioned("a", token_digest("token-of-a-0123456789")),
                                     Provisioned("b", token_digest("token-of-b-0123456789"))]))
    return Registry(path)


def test_a_registry_closes_enrolment_to_provisioned_tokens(registry):
    credentials = Credentials(None, "operator-0123456789", registry)
    assert not credentials.open_enrollment
    assert credentials.refusal(CALL + "Join", "token-of-a-0123456789") is None
    assert credentials.refusal(CALL + "Join", "someone-else-0123456789") is not None
    assert credentials.issue_token("a", "token-of-a-0123456789") == "token-of-a-0123456789"
    with pytest.raises(Unauthenticated, match="provisioned for client 'a'"):
        credentials.issue_token("b", "token-of-a-0123456789")
    with pytest.raises(Unauthenticated, match="not provisioned"):
        credentials.issue_token("c", None)


def test_operator_calls_take_the_operator_token_only(registry):
    credentials = Credentials(None, "operator-0123456789", registry)
    credentials.register("id-a", token_digest("token-of-a-0123456789"))
    for call in ("ListClients", "RemoveClient"):
        assert credentials.refusal(CALL + call, "operator-0123456789") is None
        assert "operator token" in credentials.refusal(CALL + call, "token-of-a-0123456789")
    assert credentials.refusal(CALL + "Status", "operator-0123456789") is None


@pytest.mark.parametrize("token", ["a-wrong-operator-token-0123", None])
def test_a_wrong_token_for_status_names_the_operator_token_not_join(registry, token):
    """Status is the operator's call too: telling an operator to 'join again' is wrong advice."""
    refusal = Credentials(None, "operator-0123456789", registry).refusal(CALL + "Status", token)
    assert "operator token" in refusal and "operator.toml" in refusal and "join again" not in refusal


def test_revocation_refuses_token_name_and_certificate_at_once(registry, tmp_path):
    credentials = Credentials("enrol-0123456789abcdef", None, registry)
    digest = token_digest("token-of-a-0123456789")
    credentials.register("id-a", digest)
    assert credentials.refusal(CALL + "NextTask", "token-of-a-0123456789") is None
    credentials.revoke("a", [digest], ["ab" * 32])
    assert credentials.refusal(CALL + "NextTask", "token-of-a-0123456789") is not None
    assert credentials.refusal(CALL + "Join", "token-of-a-0123456789") is not None  # not as a provisioned token either
    with pytest.raises(Unauthenticated, match="removed"):
        credentials.issue_token("a", "enrol-0123456789abcdef")  # not even with the enrolment token
    credentials.register("id-a", digest)  # a restart re-registering stored clients keeps it out
    assert credentials.client_for("token-of-a-0123456789") is None
    assert credentials.checks_certificates
    assert credentials.refusal(CALL + "NextTask", "token-of-b-0123456789") is not None  # b never joined
    assert credentials.refusal(CALL + "Join", "token-of-b-0123456789") is None


def test_a_removed_client_is_told_so_with_the_reason_until_it_is_readmitted(registry):
    credentials = Credentials("enrol-0123456789abcdef", None, registry)
    digest = token_digest("token-of-a-0123456789")
    credentials.register("id-a", digest)
    credentials.revoke("a", [digest], [], "leaked kit")
    for call in ("NextTask", "Join", "GetRun"):
        assert credentials.refusal(CALL + call, "token-of-a-0123456789") == \
            f"{call}: client 'a' was removed by the operator: leaked kit"
    with pytest.raises(Unauthenticated, match="removed by the operator: leaked kit"):
        credentials.issue_token("a", "enrol-0123456789abcdef")
    credentials.readmit("a")
    credentials.register("id-a", digest)
    assert credentials.refusal(CALL + "NextTask", "token-of-a-0123456789") is None
    assert credentials.issue_token("a", "token-of-a-0123456789") == "token-of-a-0123456789"


def test_a_removal_marked_in_the_registry_refuses_the_kit_in_a_later_run(registry):
    registry.mark("a", "left the consortium", 1.0)
    credentials = Credentials(None, None, registry)  # a later run: nothing revoked in it
    assert credentials.refusal(CALL + "Join", "token-of-a-0123456789") == \
        "Join: client 'a' was removed by the operator: left the consortium"
    with pytest.raises(Unauthenticated, match="removed by the operator: left the consortium"):
        credentials.issue_token("a", "token-of-a-0123456789")
    registry.mark("a", None)
    assert credentials.refusal(CALL + "Join", "token-of-a-0123456789") is None
