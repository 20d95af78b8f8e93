"""A real DP run (issue 31): the target epsilon ends it at the right round, and SIGKILLs do not move the budget.

The noise itself is the aggregator's business; this test holds whether or not the release is
noisy, since the budget depends only on what was released and how the clients were sampled.
"""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("dp_accounting")

from flora.common.privacy.accountant import epsilon_of_rounds
from flora.server.admin.console import render_plain
from flora.server.admin.report import write_report
from test_admin_kits import scrape
from test_server_restart import Session

pytestmark = pytest.mark.slow

SIGMA, TARGET = 4.0, 5.0
DP_FLAGS = ("--dp-noise-multiplier", str(SIGMA), "--dp-clip-norm", "0.5", "--dp-target-epsilon", str(TARGET),
            "--rounds", "4", "--metrics-port", "0")


def spent(rounds: int) -> float:
    """Both clients every round (2 of 2), the sketch release (2 mechanisms), delta 1e-5: 3.19, 4.73, 5.98."""
    return epsilon_of_rounds(SIGMA, [(2, 2)] * rounds, 2, 1e-5)


def _submit(session: Session, number: int, *clients) -> None:
    for client in clients:
        assert client.wait_for_train().round == number
        assert client.submit(session.payload(client, number), number).accepted


@pytest.fixture()
def dp_session(tmp_path):
    created = Session(tmp_path / "state", *DP_FLAGS)
    yield created
    created.kill_all()


def test_target_epsilon_ends_the_run_and_sigkills_neither_reset_nor_double_count(dp_session):
    session = dp_session
    assert spent(2) <= TARGET < spent(3)
    assert "privacy plan: with 2 of 2 clients per round, target epsilon 5 allows rounds up to 2 of 4" in session.server.output()
    _submit(session, 1, session.alice, session.bob)
    session.operator.wait_for_version(1)
    assert session.operator.status().privacy.epsilon == pytest.approx(spent(1))

    session.restart_after_kill()  # between rounds
    status = session.operator.status()
    assert status.privacy.epsilon == pytest.approx(spent(1)) and status.privacy.delta == 1e-5
    _submit(session, 2, session.alice)
    session.restart_after_kill()  # in the middle of round 2, one update recorded
    _submit(session, 2, session.bob)
    session.operator.wait_for_version(2)

    history = session.history()
    assert [(h["round"], h["dp_delta"]) for h in history] == [(1, 1e-5), (2, 1e-5)]
    assert [h["dp_epsilon"] for h in history] == pytest.approx([spent(1), spent(2)])
    assert [(h["dp_population"], h["dp_selected"]) for h in history] == [(2, 2), (2, 2)]
    session.alice.next_task()  # back after the restart: round 3 would have its two clients
    status = _finished(session)
    line = f"privacy budget: round 3 would spend epsilon {spent(3):.4g} > target 5"
    assert status.global_version == 2 and status.privacy.ended.startswith(line)
    assert line in session.server.output() and "the run ends at version 2" in session.server.output()
    assert session.bob.next_task().WhichOneof("kind") == "finished"
    assert [r.dp_epsilon for r in status.recent_rounds] == pytest.approx([spent(1), spent(2)])
    console = render_plain(status, time.time())
    assert f"privacy: epsilon {spent(2):.4g} spent of target 5 at delta 1e-05" in console
    assert not re.search(r"\bnan\b", console + session.server.output(), re.IGNORECASE)  # no unmeasured error shown as nan
    url = next(line.split("metrics on ", 1)[1].split()[0] for line in session.server.lines if "metrics on http" in line)
    metrics = _when(lambda: (m := scrape(url))[("flora_dp_epsilon", ())] > spent(1) and m)
    assert metrics[("flora_dp_epsilon", ())] == pytest.approx(spent(2))
    assert (metrics[("flora_dp_delta", ())], metrics[("flora_dp_target_epsilon", ())]) == (1e-5, TARGET)
    report = (write_report(session.state_dir, session.state_dir.parent / "report", require_png=False).markdown).read_text()
    assert f"epsilon {spent(2):.4g} at delta 1e-05 after 2 rounds" in report and not re.search(r"\bnan\b", report, re.IGNORECASE)

    session.restart_after_kill()  # the end is kept: no round 3 after a restart either
    status = session.operator.status()
    assert (status.state, status.global_version) == ("finished", 2)
    assert status.privacy.epsilon == pytest.approx(spent(2)) and "round 3 would have passed" in status.privacy.ended
    assert len(session.history()) == 2


def _finished(session: Session):
    return _when(lambda: (status := session.operator.status()).state == "finished" and status)


def _when(probe, attempts: int = 100):
    """The probe's first truthy answer, polled every 0.1 s."""
    for _ in range(attempts):
        if answer := probe():
            return answer
        time.sleep(0.1)
    raise AssertionError("the condition never held")


def test_an_abandoned_dp_attempt_drops_its_update_and_the_next_attempt_samples_afresh(tmp_path):
    # The test waits out attempt 1's deadline; each attempt's own calls (two or three scripted RPCs)
    # take well under a second even on a loaded machine, so 5 s leaves them a wide margin.
    session = Session(tmp_path / "state", "--dp-noise-multiplier", str(SIGMA), "--dp-clip-norm", "0.5",
                      "--quorum", "1.0", "--round-deadline-s", "5")
    try:
        payload = session.payload(session.alice, 1)
        assert session.alice.wait_for_train().round == 1
        assert session.alice.submit(payload, 1).accepted  # bob never answers attempt 1
        status = _when(lambda: (s := session.operator.status()).round.attempt == 2 and s, attempts=300)
        assert list(status.round.submitted) == [] and len(status.round.selected) == 2  # dropped, both sampled again
        assert session.alice.submit(payload, 1).accepted  # the same update may come again: it was not at fault
        _submit(session, 1, session.bob)
        session.operator.wait_for_version(1)
        (record,) = session.history()
        assert [e["name"] for e in record["excluded"]] == ["alice"] and "abandoned" in record["excluded"][0]["reason"]
        assert record["num_clients"] == 2 and record["dp_epsilon"] == pytest.approx(spent(1))
    finally:
        session.kill_all()
