"""Hands the engine thread's outputs to the event loop, one wake-up per batch of outputs.

A decode step produces one output per running request. Waking the event loop for each
(`call_soon_threadsafe` writes to its self-pipe and runs a callback under the GIL) makes the
loop thread take the GIL from the engine thread dozens of times a step; here the first output
of a batch schedules one flush and the rest of that step's outputs only join a list.
"""

from __future__ import annotations

import asyncio
import threading

from services.gpu_worker.engine.sequence import StepOutput


class OutputRelay:
    """Thread-safe `deliver(queue, out)`; the event loop puts the outputs in their queues,
    in the order they were delivered."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[StepOutput], StepOutput]] = []

    def deliver(self, queue: asyncio.Queue[StepOutput], out: StepOutput) -> None:
        """Called on the engine thread."""
        with self._lock:
            self._pending.append((queue, out))
            first = len(self._pending) == 1
        if first:
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for queue, out in batch:
            queue.put_nowait(out)


def merge_outputs(outs: list[StepOutput]) -> StepOutput:
    """Consecutive outputs of one request as one: their tokens, text and logprobs joined, and
    the last one's finish, usage and error. A stream that fell behind sends one message for
    the tokens it owes instead of one per step."""
    last = outs[-1]
    if len(outs) == 1:
        return last
    return StepOutput(
        request_id=last.request_id,
        token_ids=[t for o in outs for t in o.token_ids],
        text="".join(o.text for o in outs),
        logprobs=[p for o in outs for p in o.logprobs],
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        queue_time_ms=last.queue_time_ms,
        time_to_first_token_ms=last.time_to_first_token_ms,
        error=last.error,
    )
