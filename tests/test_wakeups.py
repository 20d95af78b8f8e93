"""server/wakeups.py: a one-shot signal that releases its waiters a batch per loop iteration."""

from __future__ import annotations

import asyncio

import pytest

from flora.server.wakeups import Signal


def test_waiters_are_released_in_order_a_batch_per_loop_iteration():
    async def scenario() -> list[str]:
        signal, log = Signal(batch=10), []

        async def waiter(i: int) -> None:
            await signal.wait()
            log.append(f"w{i}")

        tasks = [asyncio.create_task(waiter(i)) for i in range(25)]
        await asyncio.sleep(0)  # every waiter is waiting
        signal.set()
        asyncio.get_running_loop().call_soon(log.append, "other")  # e.g. a health check's callback
        await asyncio.gather(*tasks)
        return log

    log = asyncio.run(scenario())
    assert [x for x in log if x != "other"] == [f"w{i}" for i in range(25)]
    assert log.index("other") == 10  # it ran after the first batch, not after all 25


def test_a_timed_out_wait_leaves_nothing_behind_and_later_waits_return_at_once():
    async def scenario() -> None:
        signal = Signal(batch=2)
        for _ in range(50):  # long-polls that time out while nothing changes
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.001):
                    await signal.wait()
        assert not signal._waiters  # no leak while no change comes for a long time
        survivor = asyncio.create_task(signal.wait())
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(signal.wait())
        await asyncio.sleep(0)
        cancelled.cancel()
        signal.set()
        signal.set()  # idempotent
        await asyncio.wait_for(survivor, 1)
        assert signal.is_set()
        await asyncio.wait_for(signal.wait(), 1)  # set already: no wait

    asyncio.run(scenario())


def test_batch_must_be_positive():
    with pytest.raises(ValueError, match="batch must be >= 1"):
        Signal(batch=0)
