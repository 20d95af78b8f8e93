"""Waking every waiting long-poll at a state change without stalling the event loop.

``asyncio.Event.set`` makes all of its waiters runnable in one loop iteration: with 1,000
NextTask long-polls, 1,000 replies are built and handed to grpc before the loop looks at its
sockets again, so a health check or a heartbeat that arrives meanwhile waits behind all of them
(bench/load.py measured that as the health check's worst case). A ``Signal`` is the same one-shot
event, but releases its waiters ``batch`` per loop iteration, oldest first: the loop polls its
sockets between batches, and the last waiter is woken a few milliseconds later than it would be.
"""

from __future__ import annotations

import asyncio

BATCH = 32  # waiters released per loop iteration: each costs grpc ~0.1 ms to answer


class Signal:
    """A one-shot event: ``await wait()`` until ``set()``, after which every wait returns at once."""

    def __init__(self, batch: int = BATCH) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self._batch = batch
        self._set = False
        self._waiters: dict[asyncio.Future, None] = {}  # insertion-ordered; O(1) removal on timeout

    def is_set(self) -> bool:
        """Whether ``set`` was called (some waiters may still be about to be released)."""
        return self._set

    async def wait(self) -> None:
        """Return once the signal is set; cancelling the wait (a timeout) leaves no trace behind."""
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = None
        try:
            await waiter
        finally:
            self._waiters.pop(waiter, None)

    def set(self) -> None:
        """Release every waiter, ``batch`` per loop iteration, in the order they started waiting."""
        if self._set:
            return
        self._set = True
        waiters, self._waiters = list(self._waiters), {}
        if waiters:
            self._release(waiters, 0)

    def _release(self, waiters: list[asyncio.Future], start: int) -> None:
        for waiter in waiters[start:start + self._batch]:
            if not waiter.done():  # a wait cancelled meanwhile
                waiter.set_result(None)
        if start + self._batch < len(waiters):
            # call_soon runs in the next iteration, after the loop has polled its sockets.
            waiters[0].get_loop().call_soon(self._release, waiters, start + self._batch)
