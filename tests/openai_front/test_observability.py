"""Request ids (accepted and returned as `x-request-id`, on every log line of every service the
request crosses) and the front's Prometheus metrics, counting what went through."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from openai import AsyncOpenAI

from services.common.grpc_server import free_port
from services.common.logging import RequestIdFilter
from tests.e2e.test_metrics import scrape, value
from tests.openai_front.conftest import Served, openai_client, start_front

BODY = {"model": "ad8", "prompt": "hi", "max_tokens": 3}


async def post(served: Served, headers: dict[str, str]) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{served.front.url}/completions", json=BODY, headers=headers) as reply,
    ):
        await reply.read()
        return reply.status, reply.headers["x-request-id"]


async def test_request_id_is_returned_and_reaches_every_service_log(
    served: Served, client: AsyncOpenAI, caplog: pytest.LogCaptureFixture
):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO)
    reply = await client.completions.with_raw_response.create(
        model="ad8", prompt="hi", max_tokens=3, extra_headers={"x-request-id": "trace-http-7"}
    )
    assert reply.headers["x-request-id"] == "trace-http-7"
    traced = {
        r.name.split(".")[1]
        for r in caplog.records
        if getattr(r, "request_id", None) == "trace-http-7"
    }
    assert {"openai_front", "router", "gpu_worker"} <= traced, traced


async def test_request_ids_are_made_when_missing_and_bad_ones_refused(served: Served):
    first, second = await post(served, {}), await post(served, {})
    assert first[0] == second[0] == 200
    assert len(first[1]) == 32 and first[1] != second[1]
    status, given_back = await post(served, {"x-request-id": "r" * 129})
    assert status == 400 and len(given_back) == 32  # a fresh id, not the refused one


async def test_front_metrics_count_requests_tokens_and_errors(served: Served):
    port = free_port()
    front = await start_front(served.router.port, metrics_port=port)
    try:
        async with openai_client(front) as client:
            await client.completions.create(
                model="ad8", prompt="hi", max_tokens=5, extra_body={"ignore_eos": True}
            )
            stream = await client.chat.completions.create(
                model="ad16",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            async for _ in stream:
                pass
            with pytest.raises(Exception, match="404"):
                await client.completions.create(model="nope", prompt="hi", max_tokens=2)
        samples = await asyncio.to_thread(scrape, port)
    finally:
        await front.stop()
    http = "manylora:http_requests_total"
    assert value(samples, http, route="/v1/completions", status="200") == 1
    assert value(samples, http, route="/v1/chat/completions", status="200") == 1
    assert value(samples, http, route="/v1/completions", status="404") == 1
    assert value(samples, "manylora:request_success_total", finished_reason="length") == 2
    assert value(samples, "manylora:request_failure_total", code="NOT_FOUND") == 1
    assert value(samples, "manylora:generation_tokens_total") == 9
    assert value(samples, "manylora:time_to_first_token_seconds_count") == 2
    assert value(samples, "manylora:num_requests_running") == 0
