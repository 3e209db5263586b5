"""Outputs from the engine thread to the event loop: order, batching, and merging."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from services.gpu_worker.engine.sequence import FinishReason, StepOutput
from services.gpu_worker.serving.output_relay import HeldOutputs, OutputRelay, merge_outputs
from services.gpu_worker.serving.servicer import _next_outputs


def out(request: str, token: int, finish: FinishReason | None = None) -> StepOutput:
    return StepOutput(request, [token], chr(token), [-0.1 * token], finish, completion_tokens=token)


async def test_one_wake_up_carries_a_whole_step_in_order(monkeypatch: pytest.MonkeyPatch):
    """While the loop is busy, the engine thread delivers a step's outputs for two requests:
    one call_soon_threadsafe, and each queue gets its outputs in delivery order."""
    loop = asyncio.get_running_loop()
    wakeups: list[Any] = []
    original = loop.call_soon_threadsafe

    def counting(*args: Any) -> Any:
        wakeups.append(args)
        return original(*args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    relay = OutputRelay(loop)
    queues: dict[str, asyncio.Queue[StepOutput]] = {"a": asyncio.Queue(), "b": asyncio.Queue()}

    def engine_step() -> None:
        for token in range(10):
            for name, queue in queues.items():
                relay.deliver(queue, out(name, token))

    thread = threading.Thread(target=engine_step)
    thread.start()
    thread.join()  # the loop is blocked meanwhile, as it is while it serves other streams
    await asyncio.sleep(0)
    assert len(wakeups) == 1
    for name, queue in queues.items():
        got = [queue.get_nowait() for _ in range(queue.qsize())]
        assert [o.token_ids[0] for o in got] == list(range(10))
        assert {o.request_id for o in got} == {name}
    relay.deliver(queues["a"], out("a", 10))  # the next batch wakes the loop again
    await asyncio.sleep(0)
    assert len(wakeups) == 2 and queues["a"].qsize() == 1


def test_merged_outputs_join_tokens_and_keep_the_last_finish() -> None:
    merged = merge_outputs([out("r", 3), out("r", 4), out("r", 5, FinishReason.LENGTH)])
    assert merged.token_ids == [3, 4, 5]
    assert merged.text == "\x03\x04\x05"
    assert merged.logprobs == pytest.approx([-0.3, -0.4, -0.5])
    assert merged.finish_reason is FinishReason.LENGTH
    assert merged.completion_tokens == 5
    single = out("r", 7)
    assert merge_outputs([single]) is single


def test_merged_outputs_carry_the_last_ones_usage_and_error() -> None:
    # Usage is set on a request's final output only (Sequence.output), so the last one's is
    # the request's; the earlier outputs' zeros must not leak into the merged message.
    last = StepOutput(
        "r",
        [9],
        "x",
        [-0.5],
        FinishReason.ABORTED,
        prompt_tokens=12,
        completion_tokens=3,
        queue_time_ms=1.5,
        time_to_first_token_ms=2.5,
        error=RuntimeError("boom"),
    )
    merged = merge_outputs([out("r", 1), out("r", 2), last])
    assert (merged.request_id, merged.token_ids, merged.text) == ("r", [1, 2, 9], "\x01\x02x")
    usage = (merged.prompt_tokens, merged.completion_tokens)
    assert usage == (12, 3)
    assert (merged.queue_time_ms, merged.time_to_first_token_ms) == (1.5, 2.5)
    assert merged.error is last.error


async def test_a_lagging_stream_takes_what_is_queued_up_to_its_last_output() -> None:
    queue: asyncio.Queue[StepOutput] = asyncio.Queue()
    for token in (1, 2):
        queue.put_nowait(out("r", token))
    assert [o.token_ids for o in await _next_outputs(queue)] == [[1], [2]]
    queue.put_nowait(out("r", 3, FinishReason.STOP))
    failed = out("r", 4, FinishReason.ABORTED)
    failed.error = RuntimeError("boom")
    queue.put_nowait(failed)  # never follows a last output in practice; must not be merged
    assert [o.token_ids for o in await _next_outputs(queue)] == [[3]]
    assert (await _next_outputs(queue))[0].error is not None


class Recording:
    """Stands in for OutputRelay: records what a HeldOutputs hands on, and when."""

    def __init__(self) -> None:
        self.handed: list[list[int]] = []
        self.finishes: list[FinishReason | None] = []
        self.errors: list[BaseException | None] = []

    def deliver(self, queue: Any, output: StepOutput) -> None:
        self.handed.append(output.token_ids)
        self.finishes.append(output.finish_reason)
        self.errors.append(output.error)


def test_held_outputs_go_on_every_interval_tokens_first_token_and_end_at_once() -> None:
    relay = Recording()
    held = HeldOutputs(relay, asyncio.Queue(), interval=4)  # type: ignore[arg-type]
    steps = []
    for token in range(1, 11):
        held.deliver(out("r", token, FinishReason.LENGTH if token == 10 else None))
        steps.append(list(relay.handed))
    assert steps[0] == [[1]]  # the first token at once
    assert steps[3] == [[1]]  # tokens 2, 3, 4 held
    assert steps[4] == [[1], [2, 3, 4, 5]]  # 4 held tokens: on, as one output, in order
    assert steps[8] == [[1], [2, 3, 4, 5], [6, 7, 8, 9]]
    assert relay.handed == [[1], [2, 3, 4, 5], [6, 7, 8, 9], [10]]  # the last at once
    assert relay.finishes == [None, None, None, FinishReason.LENGTH]


def test_held_outputs_hand_on_a_failure_at_once_and_hold_nothing_at_interval_one() -> None:
    relay = Recording()
    held = HeldOutputs(relay, asyncio.Queue(), interval=8)  # type: ignore[arg-type]
    held.deliver(StepOutput("r", [], "", []))  # no token yet (a prompt chunk): not held
    held.deliver(out("r", 1))
    held.deliver(out("r", 2))
    held.deliver(out("r", 3))
    failed = StepOutput("r", [], "", [], FinishReason.ABORTED, error=RuntimeError("boom"))
    held.deliver(failed)
    # What was held goes on at once, before the failure, which stays an output of its own
    # (the handler sends the tokens, then fails the call).
    assert relay.handed == [[], [1], [2, 3], []]
    assert relay.errors == [None, None, None, failed.error]
    every = Recording()
    one = HeldOutputs(every, asyncio.Queue(), interval=1)  # type: ignore[arg-type]
    for token in range(1, 4):
        one.deliver(out("r", token))
        assert every.handed[-1] == [token]
