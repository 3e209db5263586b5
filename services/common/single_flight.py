"""Run one coroutine per key at a time and hand its result to every caller that asked meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[T]] = {}

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._running[key] = task
            task.add_done_callback(lambda done: self._finish(key, done))
        # Shielded: a caller that goes away must not cancel the work the others wait for.
        return await asyncio.shield(task)

    def _finish(self, key: Hashable, task: asyncio.Task[T]) -> None:
        self._running.pop(key, None)
        if not task.cancelled():
            task.exception()  # marks it retrieved when every waiter has gone away

    def __len__(self) -> int:
        return len(self._running)
