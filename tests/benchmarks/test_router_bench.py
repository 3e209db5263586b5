"""The router benchmarks' own checks: a stream that loses, repeats or reorders a token, or
does not finish, counts as dropped; the fake worker sends every token once, in order, and
merges what a stream owes when it is read late; the hop is each path minus the direct one."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from benchmarks.fake_worker import FakeWorker
from benchmarks.router_bench import StreamError, Workload, one_stream
from benchmarks.router_hop_bench import DIRECT, Samples, summary
from benchmarks.stream_interval_bench import table
from manylora.v1 import common_pb2


def message(ids: list[int], last: bool = False) -> common_pb2.GenerateResponse:
    response = common_pb2.GenerateResponse(token_ids=ids)
    if last:
        response.finish_reason = common_pb2.LENGTH
    return response


class Replay:
    """A stub whose Generate streams the given messages."""

    def __init__(self, messages: list[common_pb2.GenerateResponse]):
        self.messages = messages

    def Generate(self, request, timeout=None) -> AsyncIterator[common_pb2.GenerateResponse]:
        async def stream() -> AsyncIterator[common_pb2.GenerateResponse]:
            for m in self.messages:
                yield m

        return stream()


async def test_a_whole_stream_passes_and_counts_its_messages():
    stub = Replay([message([0]), message([1, 2]), message([3], last=True)])
    assert await one_stream(stub, 0, Workload(tokens=4)) == 3  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "messages",
    [
        [message([0]), message([2]), message([1, 3], last=True)],  # reordered
        [message([0, 1]), message([1, 2, 3], last=True)],  # repeated
        [message([0, 1]), message([3], last=True)],  # lost
        [message([0, 1]), message([2, 3])],  # never finished
        [message([0, 1, 2], last=True)],  # finished short
        [message([0, 1, 2, 3], last=True), message([])],  # a message after the last
    ],
)
async def test_a_broken_stream_is_counted_as_dropped(messages):
    with pytest.raises(StreamError):
        await one_stream(Replay(messages), 0, Workload(tokens=4))  # type: ignore[arg-type]


async def collect(fake: FakeWorker, total: int, read_late_s: float = 0.0) -> list[list[int]]:
    batches = []
    async for ids in fake._batches(total):
        batches.append(list(ids))
        if read_late_s:
            time.sleep(read_late_s)  # a consumer that falls behind (blocking on purpose)
    return batches


async def test_fixed_messages_carry_tokens_per_message():
    assert await collect(FakeWorker(tokens_per_message=3), 7) == [[0, 1, 2], [3, 4, 5], [6]]


async def test_paced_messages_merge_what_a_late_reader_owes():
    prompt = await collect(FakeWorker(step_s=0.002), 6)
    late = await collect(FakeWorker(step_s=0.002), 30, read_late_s=0.01)
    for batches, total in ((prompt, 6), (late, 30)):
        assert [t for b in batches for t in b] == list(range(total))
    assert max(len(b) for b in late) > 1  # ~5 steps made during each late read
    assert len(late) < 30


def test_the_hop_is_each_path_minus_the_direct_one():
    direct = Samples(DIRECT, ttft_ms=[10.0] * 100, delivery_ms=[0.5] * 100)
    routed = Samples("router", ttft_ms=[11.0] * 99 + [30.0], delivery_ms=[0.75] * 100)
    rows = {r["path"]: r for r in summary([direct, routed])}
    assert rows[DIRECT]["hop_ttft_ms"] == {"p50": 0.0, "p99": 0.0}
    assert rows["router"]["hop_ttft_ms"]["p50"] == 1.0
    assert rows["router"]["hop_ttft_ms"]["p99"] == pytest.approx(11.0 + 0.01 * 19.0 - 10.0)
    assert rows["router"]["hop_delivery_ms"] == {"p50": 0.25, "p99": 0.25}


def test_the_stream_interval_table_weighs_rounds_by_their_tokens():
    rows = [
        {"stream_interval": 1, "tokens": 100, "seconds": 1.0, "errors": 0,
         "worker_cpu_us_per_token": 300.0, "router_cpu_us_per_token": 90.0},
        {"stream_interval": 1, "tokens": 300, "seconds": 1.0, "errors": 1,
         "worker_cpu_us_per_token": 100.0, "router_cpu_us_per_token": 10.0},
    ]  # fmt: skip
    # (100 * 300 + 300 * 100) / 400 = 150 µs; (100 * 90 + 300 * 10) / 400 = 30 µs; 400 / 2 s.
    assert table(rows).splitlines()[-1] == "| 1 | 2 | 200 | 150 | 30 | 1 |"
