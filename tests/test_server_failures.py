"""Running out of disk or descriptors, and other faults: one status per failure, memory kept in step.

Unit level: the servicer's one mapping from failures to refusals, the round driver that must
survive a database that cannot be written, the fd limit raised at start, and the read limits of
artifacts the server wrote itself (defects 5 and 6 of issue 11).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from flora.common.lora import LoraAdapter, LoraPair
from flora.common.payload import (
    PayloadError,
    PayloadLimits,
    PayloadMeta,
    artifact_limits,
    open_safetensors,
    read_adapter,
    write_adapter,
)
from flora.server import errors
from flora.server.config import ServerSettings
from flora.server.layout import Layout
from flora.server.lifecycle import RoundDriver
from flora.server.rounds import RoundMachine, RoundPolicy, RoundState, Selection
from flora.server.servicer import STATUS_CODES, as_refusal
from flora.server.startup import raise_fd_limit
from flora.server.store import Store


def _wrapped(cause: Exception) -> Exception:
    """``KeyError`` raised from ``cause``, as a library that wraps the OS error raises it."""
    try:
        try:
            raise cause
        except Exception as inner:
            raise KeyError("wrapper") from inner
    except KeyError as error:
        return error


def _replaced(cause: Exception) -> Exception:
    """``ValueError`` raised ``from None`` while handling ``cause``: its author says it is not the cause."""
    try:
        try:
            raise cause
        except Exception:
            raise ValueError("a bad payload, found while the disk was full") from None
    except ValueError as error:
        return error


@pytest.mark.parametrize(("error", "kind", "words"), [
    (sqlite3.OperationalError("database or disk is full"), errors.ResourceExhausted, "disk is full"),
    (OSError(errno.ENOSPC, "No space left on device"), errors.ResourceExhausted, "disk is full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errors.ResourceExhausted, "disk is full"),
    (OSError(errno.EMFILE, "Too many open files"), errors.Unavailable, "file descriptors"),
    (sqlite3.OperationalError("unable to open database file"), errors.Unavailable, "database is unavailable"),
    # Issue 28 items 1 and 4: libraries that report an OS error as text, and errors wrapping one.
    (SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"'),
     errors.ResourceExhausted, "disk is full"),
    (RuntimeError("unable to open file </s/tmp/upload-1.part> in read-only mode: Too many open files (24)"),
     errors.Unavailable, "file descriptors"),
    (RuntimeError("[Errno 122] Disk quota exceeded"), errors.ResourceExhausted, "disk is full"),
    (_wrapped(OSError(errno.ENFILE, "Too many open files in system")), errors.Unavailable, "file descriptors"),
    (_wrapped(sqlite3.OperationalError("database or disk is full")), errors.ResourceExhausted, "disk is full"),
    # A refusal's text may quote a client: it never passes a bad payload off as a full disk.
    (PayloadError("metadata 'kind': 'No space left on device (os error 28)' is not a client update"), errors.Internal,
     "internal server error"),
    (_replaced(OSError(errno.ENOSPC, "No space left on device")), errors.Internal, "internal server error"),
    (OverflowError("Python int too large to convert to SQLite INTEGER"), errors.Internal, "internal server error"),
    (KeyError("secret-internal-detail"), errors.Internal, "internal server error"),
])
def test_every_failure_maps_to_a_status_and_no_exception_text_leaks(error, kind, words):
    refusal = as_refusal("Join", error)
    assert type(refusal) is kind and words in str(refusal)
    assert "SQLite" not in str(refusal) and "secret" not in str(refusal) and "Errno" not in str(refusal)
    assert STATUS_CODES[kind].name in ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL")


def test_a_refusal_passes_through_unchanged():
    refusal = errors.FailedPrecondition("round 3 is not open")
    assert as_refusal("SubmitUpdate", refusal) is refusal


class FullDisk(Store):
    """A store whose writes fail with SQLite's disk-full error while ``full`` is set."""

    full = False

    def _transaction(self):
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        return super()._transaction()


def _driver(tmp_path: Path, store: Store) -> RoundDriver:
    policy = RoundPolicy(rounds=3, min_clients=1, selection=Selection("all"), quorum=1.0, deadline_s=0.0,
                         client_timeout_s=60, seed=0)
    machine = RoundMachine(policy)
    settings = ServerSettings(state_dir=tmp_path)
    return RoundDriver(settings, Layout(tmp_path), store, aggregator=None, machine=machine)


def test_a_write_that_fails_leaves_memory_as_the_database_has_it(tmp_path, caplog):
    async def scenario():
        store = FullDisk(tmp_path / "state.db")
        driver = _driver(tmp_path, store)
        driver.machine.joined("c1", time.time())
        store.full = True
        with caplog.at_level(logging.ERROR):
            driver.advance()  # wants to open round 1: the write fails, nothing may move
        assert driver.machine.current.state is RoundState.WAITING and driver.machine.current.attempt == 0
        assert "database or disk is full" in caplog.text
        store.full = False
        driver.advance()  # space is back: the same decision now lands, in memory and on disk
        assert driver.machine.current.state is RoundState.OPEN
        assert store.load_round(1).state is RoundState.OPEN
        store.close()

    asyncio.run(scenario())


def test_the_ticker_survives_failing_writes_and_enforces_deadlines_after(tmp_path, caplog):
    async def scenario():
        store = FullDisk(tmp_path / "state.db")
        driver = _driver(tmp_path, store)
        driver.machine.joined("c1", time.time())
        driver.advance()  # round 1 opens with a deadline already due (deadline_s = 0)
        store.full = True
        driver.start()
        await asyncio.sleep(1.0)
        assert not driver._ticker.done()
        assert driver.machine.current.state is RoundState.OPEN  # the abandonment was not saved: not made
        store.full = False
        for _ in range(100):  # within the ticker's backoff (at most 16 ticks = 4 s)
            if store.load_round(1).attempt >= 2:
                break
            await asyncio.sleep(0.1)
        assert store.load_round(1).attempt >= 2  # abandoned at the deadline and reopened
        assert driver.machine.current.attempt == store.load_round(1).attempt
        await driver.stop()
        store.close()

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert caplog.text.count("could not be saved") >= 1


def test_the_open_file_limit_is_raised_to_the_hard_limit(caplog):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        with caplog.at_level(logging.INFO):
            now = raise_fd_limit()
        assert now == (hard if hard != resource.RLIM_INFINITY else max(lowered, 1 << 20))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
        assert f"open-file limit {now}: room for about" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_artifact_the_server_wrote_is_read_back_whatever_its_stacked_rank(tmp_path):
    """Defect 5: 257 clients of rank 256 stack to rank 65,792, past the per-client limit of 65,536."""
    shapes = {"m": (2, 3)}
    rank = 65_792
    adapter = LoraAdapter({"m": LoraPair(torch.ones(rank, 3), torch.ones(2, rank))}, 1.0)
    path = tmp_path / "v000001.safetensors"
    size, _ = write_adapter(path, adapter, PayloadMeta("global_adapter", rank=rank, alpha=float(rank),
                                                       scaling_rule="standard", round=1, version=1))
    with pytest.raises(PayloadError, match="outside"):
        read_adapter(path, shapes, limits=PayloadLimits())
    read, _ = read_adapter(path, shapes, limits=artifact_limits(size, shapes))
    assert read.rank == rank
    assert rank <= artifact_limits(size, shapes).max_rank <= 3 * rank  # a bound from the size (F16 at least)


def test_a_payload_that_cannot_be_opened_for_want_of_descriptors_fails_as_emfile(tmp_path):
    """Issue 28 item 4: safetensors reports any failed open as "No such file", EMFILE included."""
    path = tmp_path / "u.safetensors"
    write_adapter(path, LoraAdapter({"m": LoraPair(torch.ones(1, 3), torch.ones(2, 1))}, 1.0),
                  PayloadMeta("client_update", rank=1, alpha=1.0, scaling_rule="standard", round=1))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with pytest.raises(OSError) as failure:
            while True:
                held.append(os.open(path, os.O_RDONLY))
        assert failure.value.errno == errno.EMFILE
        with pytest.raises(OSError) as failure:
            with open_safetensors(path):
                pass
        assert failure.value.errno == errno.EMFILE and type(errors.resource_refusal(failure.value)) is errors.Unavailable
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with pytest.raises(FileNotFoundError):
        with open_safetensors(tmp_path / "absent.safetensors"):
            pass


def test_a_refusal_after_the_record_was_written_does_not_claim_nothing_was_recorded():
    """Issue 28 item 5 for uploads: the fsync after an accepted upload's row failed; the row stays."""
    for error, kind in ((OSError(errno.ENOSPC, "No space left on device"), errors.ResourceExhausted),
                        (OSError(errno.EMFILE, "Too many open files"), errors.Unavailable)):
        refusal = errors.resource_refusal(error, recorded=True)
        assert type(refusal) is kind and "recorded but not yet made durable" in str(refusal)
        assert "nothing of this request was recorded" in str(errors.resource_refusal(error))
