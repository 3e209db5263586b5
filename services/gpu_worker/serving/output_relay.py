"""Hands the engine thread's outputs to the event loop, one wake-up per batch of outputs.

A decode step produces one output per running request. Waking the event loop for each
(`call_soon_threadsafe` writes to its self-pipe and runs a callback under the GIL) makes the
loop thread take the GIL from the engine thread dozens of times a step; here the first output
of a batch schedules one flush and the rest of that step's outputs only join a list.

With a stream interval of k tokens (`--stream-interval`), each stream's outputs are held on
the engine thread until they carry k tokens (`HeldOutputs`): the stream's handler wakes, and a
message goes out, once per k tokens instead of once per step.
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


class HeldOutputs:
    """One stream's outputs on their way to its queue, held on the engine thread until they
    carry `interval` tokens. Its first token, its last output and a failure go at once, with
    whatever was held: the time to the first token and to the end are not delayed. With many
    streams running, each step then wakes the event loop's handlers (and sends messages to the
    router and the client) for 1 / `interval` of the streams, not all: the loop, which shares
    the GIL with the engine thread, and every hop after it do that many times less per token.
    `interval` 1 holds nothing. `deliver` is called on the engine thread only."""

    def __init__(
        self, relay: OutputRelay, queue: asyncio.Queue[StepOutput], interval: int = 1
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self._relay = relay
        self._queue = queue
        self._interval = interval
        self._held: list[StepOutput] = []
        self._tokens = 0
        self._sent_a_token = False

    def deliver(self, out: StepOutput) -> None:
        self._held.append(out)
        self._tokens += len(out.token_ids)
        last = out.finish_reason is not None or out.error is not None
        if self._sent_a_token and self._tokens < self._interval and not last:
            return
        self._sent_a_token = self._sent_a_token or self._tokens > 0
        held, self._held, self._tokens = self._held, [], 0
        # A failure stays an output of its own: its stream's handler sends the tokens before
        # it, then fails the call (servicer.py).
        failure = held.pop() if out.error is not None else None
        if held:  # one item, not one per output: the loop may flush between two `deliver`s
            self._relay.deliver(self._queue, merge_outputs(held))
        if failure is not None:
            self._relay.deliver(self._queue, failure)


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
