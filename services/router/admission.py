"""The router's bounded queue: at most `max_running` requests relayed at once and at most
`max_queued` waiting for their turn, first come first served; beyond that, refused at once."""

from __future__ import annotations

import asyncio
import collections
import time

from services.common.errors import ResourceExhausted


class Admission:
    def __init__(self, max_running: int, max_queued: int):
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> float:
        """Wait for a running slot; returns the seconds waited. Pair with `release`."""
        if self._running < self.max_running and not self._waiters:
            self._running += 1
            return 0.0
        if len(self._waiters) >= self.max_queued:
            raise ResourceExhausted(
                f"router queue full ({self._running} running, {len(self._waiters)} queued); "
                "retry later"
            )
        start = time.monotonic()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # the slot was handed over just as the wait was cancelled
            elif turn in self._waiters:
                self._waiters.remove(turn)
            raise
        return time.monotonic() - start

    def release(self) -> None:
        """Hand the slot to the next waiter, or free it."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on: `running` stays the same
                return
        self._running -= 1
