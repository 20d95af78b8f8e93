"""The client daemon and a secure step it cannot answer (issue 30, dropouts).

A client restarted during a secure round has lost the round's secrets; the server keeps handing
out the step it was asked for until the step's deadline. The daemon must sit that step out
instead of asking again at once: before, it looped NextTask -> skipped -> NextTask as fast as
the server answered, until the deadline (found by tests/test_secure_dropouts.py's restarts).
"""

from __future__ import annotations

import threading
import time

from fake_coordinator import FakeCoordinator
from flora.v1 import coordinator_pb2, secagg_pb2
from test_client_daemon import data_files, run_daemon, spec  # noqa: F401 - pytest fixtures


def test_a_restarted_client_sits_out_a_secure_step_it_has_no_secrets_for(tmp_path, spec, data_files):  # noqa: F811
    step = secagg_pb2.SecureTask(round=1, deadline_unix_ms=int((time.time() + 60) * 1000),
                                 mask=secagg_pb2.MaskStep(stage=1))
    fake = FakeCoordinator(spec, tasks=[coordinator_pb2.Task(secure=step)] * 50)
    stop = threading.Event()
    threading.Timer(2.0, stop.set).start()
    status, _ = run_daemon(tmp_path, fake, data_files, stop=stop, long_poll=10)
    assert status == 0
    assert len(fake.requests["NextTask"]) == 1, "the step was asked for again before its deadline or a long-poll"
    assert not fake.requests["SubmitMasked"]
