"""Background asyncio tasks of the services (heartbeats, pollers, refreshers)."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_task(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait until it has ended, so that nothing it holds (a
    Redis client, a channel) is closed under it and no 'Task was destroyed but it is pending'
    is left behind."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
