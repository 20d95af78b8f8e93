"""The process that reads the gRPC core's descriptor 2 outlives the server: a crash's last lines
are kept, and the reader stops when the server is gone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CRASH = textwrap.dedent("""
    import os
    from flora.server import handshakes
    handshakes.install("INFO")
    os.write(2, b"E1205 05:03:15.000000    9810 chttp2_server.cc:42] last words before the abort\\n")
    os.write(2, b"I1205 05:03:14.777484    9812 channel_trace.h:396] a trace record, dropped\\n")
    os.abort()
""")


def test_the_core_s_last_line_before_an_abort_reaches_stderr_and_the_trace_does_not():
    done = subprocess.run([sys.executable, "-c", CRASH], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0  # aborted
    assert "last words before the abort" in done.stderr  # read after the writer died
    assert "a trace record, dropped" not in done.stderr
    assert "Fatal Python error: Aborted" in done.stderr  # faulthandler writes past the pipe


INTERRUPTED = textwrap.dedent("""
    import os, signal, time
    from flora.server import handshakes
    handshakes.install("INFO")
    try:
        os.killpg(os.getpgid(0), signal.SIGINT)  # a Ctrl-C reaches the whole group, the reader too
        time.sleep(5)
    except KeyboardInterrupt:
        time.sleep(0.5)  # the reader has had the signal too by now
        os.write(2, b"E1205 05:03:15.000000    9810 server.cc:1] shutting down after the interrupt\\n")
""")


def test_the_reader_survives_a_ctrl_c_to_the_group_and_ends_with_the_server():
    done = subprocess.run([sys.executable, "-c", INTERRUPTED], capture_output=True, text=True, timeout=60,
                          start_new_session=True)
    assert done.returncode == 0
    assert "shutting down after the interrupt" in done.stderr  # run() returned: the reader saw the end
