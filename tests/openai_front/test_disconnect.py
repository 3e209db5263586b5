"""A client that goes away, mid-stream or while waiting for a whole answer, cancels its request
through the front, the router and the worker: the worker's memory is free again at once (well
before the generation could have ended by itself), and the front counts it as CANCELLED / 499."""

from __future__ import annotations

import asyncio

import openai
import pytest
from openai import AsyncOpenAI

from services.common.grpc_server import free_port
from tests.e2e.stack import poll_stats, worker_stats
from tests.e2e.test_metrics import scrape, value
from tests.openai_front.conftest import BASE, Served, openai_client, start_front

# The whole context: far longer than the few seconds a freed request may take to go.
LONG = 1000
FREED_WITHIN_S = 3.0


def all_free(stats) -> bool:
    return stats.running_requests == stats.waiting_requests == stats.kv_slots == 0


async def test_client_leaving_mid_stream_frees_the_worker(served: Served, client: AsyncOpenAI):
    streams = []
    for model in (BASE, "ad8"):
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "a long story"}],
            max_tokens=LONG,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        await anext(aiter(stream))
        streams.append(stream)
    worker = served.stack.workers[0]
    busy = await worker_stats(worker)
    assert busy.running_requests == 2 and busy.kv_slots > 0
    for stream in streams:
        await stream.close()
    await poll_stats(worker, all_free, timeout_s=FREED_WITHIN_S)


async def test_client_timing_out_on_a_whole_answer_frees_the_worker(served: Served):
    metrics_port = free_port()
    front = await start_front(served.router.port, metrics_port=metrics_port)
    try:
        async with openai_client(front, timeout=1.0) as client:
            with pytest.raises(openai.APITimeoutError):
                await client.completions.create(
                    model="ad16",
                    prompt="a long story",
                    max_tokens=LONG,
                    extra_body={"ignore_eos": True},
                )
        await poll_stats(served.stack.workers[0], all_free, timeout_s=FREED_WITHIN_S)
        samples = await asyncio.to_thread(scrape, metrics_port)
        assert value(samples, "manylora:request_failure_total", code="CANCELLED") == 1
        route = "/v1/completions"
        assert value(samples, "manylora:http_requests_total", route=route, status="499") == 1
        assert value(samples, "manylora:num_requests_running") == 0
    finally:
        await front.stop()
