"""Aborted uploads leave no temporary file (issue 28 item 6).

A client that cancels its upload, lets its deadline expire or sends an oversized message ends
the server's handler wherever it is; the handler's ``tmp/upload-*.part`` file, preallocated up to
64 MiB, must go with it, whatever the handler was awaiting at that moment (a hostile client
could otherwise fill the disk).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest

from flora.common.wire import update_messages
from flora.server import uploads
from flora.v1 import transfer_pb2
from harness import OPERATOR_TOKEN, ScriptedClient, make_update, running_server


def _leftovers(folder: Path, timeout_s: float = 20.0) -> list[str]:
    """The files still in ``folder`` once it has emptied or ``timeout_s`` has passed."""
    until = time.time() + timeout_s
    while (names := sorted(p.name for p in folder.iterdir())) and time.time() < until:
        time.sleep(0.1)
    return names


def test_a_receive_cancelled_while_its_file_is_being_created_removes_the_file(tmp_path, monkeypatch):
    """The race: the file is created in a worker thread; a cancel meanwhile lost its name."""
    created = threading.Event()
    make = uploads._create_upload_file

    def slow_create(path, total_bytes):
        made = make(path, total_bytes)
        created.set()
        time.sleep(0.3)  # the folder is busy with other uploads' renames
        return made

    monkeypatch.setattr(uploads, "_create_upload_file", slow_create)
    header = transfer_pb2.UpdateHeader(round=1, total_bytes=1 << 20, sha256="0" * 64)

    async def nothing():
        await asyncio.sleep(3600)
        yield

    async def scenario():
        task = asyncio.ensure_future(uploads.receive_payload(header, nothing(), tmp_path, 1 << 30))
        while not created.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        task.cancel()  # a second cancel (gRPC's, then the server's shutdown) changes nothing
        for _ in range(100):
            if not list(tmp_path.iterdir()):
                break
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert not list(tmp_path.iterdir())


def _slow(messages, pause_s: float):
    for message in messages:
        yield message
        time.sleep(pause_s)


@pytest.mark.slow
def test_cancelled_expired_and_oversized_uploads_leave_tmp_empty(tmp_path):
    flags = ("--min-clients", "1", "--rounds", "1", "--round-deadline-s", "600", "--long-poll-s", "0.5",
             "--operator-token", OPERATOR_TOKEN, "--checkpoint-every", "0")
    with running_server(tmp_path / "state", *flags) as server:
        tmp = Path(server.state_dir) / "tmp"
        base = ScriptedClient(server.address, "op", token=OPERATOR_TOKEN).status().run.base_model_hash
        alice = ScriptedClient(server.address, "alice", rank=64)
        alice.join(base)
        assert alice.wait_for_train().round == 1
        payload = make_update(alice.adapter(1), alice.alpha, 1)
        header = alice.header(payload, 1)
        calls = []
        for i in range(40):  # cancelled at every stage: header only, mid-stream, while validating
            call = alice.stub.SubmitUpdate.future(_slow(update_messages(header, payload, 4096), 0.002),
                                                  metadata=alice.metadata(), timeout=60)
            time.sleep(0.003 * (i % 10))
            call.cancel()
            calls.append(call)
        for i in range(10):  # deadlines that expire mid-stream
            calls.append(alice.stub.SubmitUpdate.future(_slow(update_messages(header, payload, 4096), 0.002),
                                                        metadata=alice.metadata(), timeout=0.01 + 0.02 * i))
        oversized = transfer_pb2.UpdateChunk(piece=transfer_pb2.UpdatePiece(offset=0, data=bytes(8 << 20)))
        for _ in range(5):
            calls.append(alice.stub.SubmitUpdate.future(iter([transfer_pb2.UpdateChunk(header=header), oversized]),
                                                        metadata=alice.metadata(), timeout=60))
        for call in calls:
            try:
                call.result()
            except grpc.RpcError as error:
                assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
            except grpc.FutureCancelledError:
                pass
        assert _leftovers(tmp) == []
        assert alice.submit(payload, 1).accepted  # the server is unharmed
        assert _leftovers(tmp) == []
