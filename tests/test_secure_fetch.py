"""A stalled FetchSecure stream holds one chunk, never Q or its attempt (issue 30).

A client that stops reading its MASK step's download leaves the server's stream suspended
between two chunks. Before, that stream held the whole payload (Q: up to GBs) and the attempt
object (its sums, keys, shares) until the client went away, long after the attempt ended; now it
holds the chunk it sent, cuts each next chunk from the step's payload as it stands, and ends
(FAILED_PRECONDITION) once the step closed. Also: the advertised keys are stored under a name
that says what they are.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from test_secure_wire import setup
from flora.common.secagg.stream import download_of
from flora.server.errors import FailedPrecondition
from flora.server.layout import Layout
from flora.server.secure_transfer import SKETCH_KIND
from flora.v1 import secagg_pb2 as sa

CHUNK = 4096


def test_a_stalled_fetch_keeps_no_attempt_alive_and_ends_once_its_step_closed():
    secure, _, current, ids = setup("flora", chunk_size=CHUNK)
    att = secure._current(current)
    payload = bytes(range(256)) * (3 * CHUNK // 256)  # three chunks
    att.steps = {0: sa.SecureTask(mask=sa.MaskStep(stage=2))}
    att.downloads = {(0, SKETCH_KIND): (payload, download_of(SKETCH_KIND, payload))}
    stream = secure.fetch(ids[0], sa.FetchSecureRequest(round=1, stage=2, kind=SKETCH_KIND))
    first = next(stream)  # the client reads one chunk, then stalls
    assert first.data == payload[:CHUNK] and first.total_bytes == len(payload)
    assert next(stream).offset == CHUNK  # each chunk from the step's payload as it stands
    attempt = weakref.ref(att)
    att.steps, att.downloads = {}, {}  # the step closes: its payload is dropped
    secure._attempt = None  # ... and the attempt ends
    del att
    gc.collect()
    assert attempt() is None, "the suspended stream keeps the ended attempt alive"
    with pytest.raises(FailedPrecondition, match="no mask step"):
        next(stream)


@pytest.mark.parametrize("offset", [0, 2 * CHUNK, 3 * CHUNK])
def test_a_fetch_ends_after_the_payloads_last_piece(offset):
    """From the start, mid-payload, or a resume at its very end (one empty piece)."""
    secure, _, current, ids = setup("flora", chunk_size=CHUNK)
    att = secure._current(current)
    payload = bytes(range(256)) * (3 * CHUNK // 256) if offset else b""
    att.steps = {0: sa.SecureTask(mask=sa.MaskStep(stage=2))}
    att.downloads = {(0, SKETCH_KIND): (payload, download_of(SKETCH_KIND, payload))}
    chunks = list(secure.fetch(ids[0], sa.FetchSecureRequest(round=1, stage=2, kind=SKETCH_KIND, offset=offset)))
    assert b"".join(c.data for c in chunks) == payload[offset:] and len(chunks) == max(1, (len(payload) - offset) // CHUNK)


def test_a_stream_whose_step_payload_changed_midway_ends_instead_of_mixing_two_payloads():
    secure, _, current, ids = setup("flora", chunk_size=CHUNK)
    att = secure._current(current)
    old, new = bytes(2 * CHUNK), bytes([1]) * (2 * CHUNK)
    att.steps = {0: sa.SecureTask(mask=sa.MaskStep(stage=2))}
    att.downloads = {(0, SKETCH_KIND): (old, download_of(SKETCH_KIND, old))}
    stream = secure.fetch(ids[0], sa.FetchSecureRequest(round=1, stage=2, kind=SKETCH_KIND))
    next(stream)
    att.downloads = {(0, SKETCH_KIND): (new, download_of(SKETCH_KIND, new))}
    with pytest.raises(FailedPrecondition, match="payload changed"):
        next(stream)


def test_advertised_keys_are_stored_as_keys_where_the_update_would_be(tmp_path):
    layout = Layout(tmp_path)
    keys = layout.keys(3, "ab12", "cd34")
    assert keys.name == "ab12.cd34.keys" and keys.parent == layout.update(3, "ab12", "cd34").parent
