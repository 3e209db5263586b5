"""The router's bounded queue: running limit, FIFO turns, refusal when full, cancelled waits."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.errors import ResourceExhausted
from services.router.admission import Admission


async def _until(predicate, timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0)


async def test_runs_up_to_the_limit_then_queues_then_refuses():
    admission = Admission(max_running=2, max_queued=1)
    assert await admission.acquire() == 0.0
    assert await admission.acquire() == 0.0
    queued_at = time.monotonic()
    waiter = asyncio.create_task(admission.acquire())
    await _until(lambda: admission.queued == 1)
    with pytest.raises(ResourceExhausted, match=r"^router queue full \(2 running, 1 queued\); "):
        await admission.acquire()
    await asyncio.sleep(0.05)
    admission.release()
    waited = await asyncio.wait_for(waiter, 1)
    # The seconds waited, as measured around the wait from outside.
    assert 0.05 <= waited <= time.monotonic() - queued_at
    assert (admission.running, admission.queued) == (2, 0)
    admission.release()
    admission.release()
    assert admission.running == 0


async def test_waiters_get_their_turn_in_arrival_order():
    admission = Admission(max_running=1, max_queued=5)
    await admission.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await admission.acquire()
        order.append(i)

    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(wait(i)))
        await _until(lambda n=i: admission.queued == n + 1)
    for i in range(4):
        admission.release()
        await _until(lambda n=i: len(order) == n + 1)
    assert order == [0, 1, 2, 3]
    await asyncio.gather(*tasks)


async def test_a_cancelled_wait_leaves_the_queue_and_loses_no_slot():
    admission = Admission(max_running=1, max_queued=2)
    await admission.acquire()
    gone = asyncio.create_task(admission.acquire())
    stays = asyncio.create_task(admission.acquire())
    await _until(lambda: admission.queued == 2)
    gone.cancel()
    await _until(lambda: admission.queued == 1)
    admission.release()  # goes to `stays`, not to the cancelled wait
    await asyncio.wait_for(stays, 1)
    assert (admission.running, admission.queued) == (1, 0)
    admission.release()
    assert admission.running == 0


async def test_cancelled_just_after_being_handed_the_slot_gives_it_back():
    admission = Admission(max_running=1, max_queued=1)
    await admission.acquire()
    waiter = asyncio.create_task(admission.acquire())
    await _until(lambda: admission.queued == 1)
    admission.release()  # hands the slot to `waiter`, which has not resumed yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.running == 0


def test_limits_are_checked_at_construction():
    for max_running, max_queued in ((0, 5), (-1, 5), (1, -1), (0, -1)):
        with pytest.raises(ValueError, match=r"^max_running must be >= 1 and max_queued >= 0$"):
            Admission(max_running, max_queued)
    assert (Admission(1, 0).running, Admission(1, 0).queued) == (0, 0)


async def test_without_a_queue_a_full_router_refuses_at_once():
    admission = Admission(max_running=1, max_queued=0)
    assert await admission.acquire() == 0.0
    # Bounded: a refusal that does not come is a wait, which must fail here, not hang.
    with pytest.raises(
        ResourceExhausted, match=r"^router queue full \(1 running, 0 queued\); retry later$"
    ):
        await asyncio.wait_for(admission.acquire(), 1)
    admission.release()
    assert await admission.acquire() == 0.0
