"""Every error class through the front, as OpenAI's client sees it: the HTTP status of the
router's gRPC code (400 INVALID_ARGUMENT, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 503
UNAVAILABLE, 504 DEADLINE_EXCEEDED) and OpenAI's error body, for whole and streamed requests;
and the front's own 400s for what it does not serve."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from services.common.grpc_server import free_port
from tests.e2e.stack import poll_stats, stop_worker
from tests.openai_front.conftest import BASE, Served, openai_client, start_front

LONG = 900  # tokens: far more than a test waits for


async def refused(client: AsyncOpenAI, chat: bool = False, **params: Any) -> openai.APIStatusError:
    """The error a request ends with; streamed requests fail before their first event."""
    with pytest.raises(openai.APIStatusError) as err:
        if chat:
            params.setdefault("messages", [{"role": "user", "content": "hi"}])
            reply = await client.chat.completions.create(**params)
        else:
            params.setdefault("prompt", "hi")
            reply = await client.completions.create(**params)
        if params.get("stream"):
            async for _ in reply:
                pass
    error = err.value
    assert isinstance(error.body, dict) and set(error.body) == {"message", "type", "param", "code"}
    assert error.message and len(error.message) < 2000
    return error


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"n": 2}, "n=2"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True}, "echo"),
        ({"logprobs": 2}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": "7"}, "seed"),
        ({"prompt": ["one", "two"]}, "a batch of 2 prompts"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt is empty"),  # the router's check
        ({"stop": ["s"] * 17}, "params.stop"),  # the router's bound
        ({"extra_body": {"frobnicate": 1}}, "unsupported parameter: 'frobnicate'"),
        ({"model": "ad8@x"}, "version"),
    ],
)
async def test_bad_completion_requests_are_400(client: AsyncOpenAI, params, needle):
    params.setdefault("model", BASE)
    params.setdefault("max_tokens", 4)
    for stream in (False, True):
        error = await refused(client, stream=stream, **params)
        assert isinstance(error, openai.BadRequestError), error
        assert needle in error.message
        assert error.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"messages": []}, "messages is required"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "role 'tool'"),  # the router's
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"top_logprobs": 3, "logprobs": True}, "top_logprobs"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens differ"),
    ],
)
async def test_bad_chat_requests_are_400(client: AsyncOpenAI, params, needle):
    params.setdefault("model", "ad8")
    error = await refused(client, chat=True, **params)
    assert isinstance(error, openai.BadRequestError)
    assert needle in error.message


async def test_malformed_http_is_openai_json(served: Served):
    url = served.front.url
    async with aiohttp.ClientSession() as session:
        cases = [
            ("POST", "/completions", b"{not json", 400),
            ("POST", "/completions", b"[1, 2]", 400),
            ("POST", "/completions", b"[" * 100_000 + b"]" * 100_000, 400),
            ("POST", "/completions", b'{"model": "tiny", "prompt": "a\\ud800"}', 400),
            (
                "POST",
                "/chat/completions",
                b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
                400,
            ),
            ("POST", "/completions", b'{"model": "tiny", "prompt": "a", "stop": "\\ud800"}', 400),
            ("POST", "/engines/x/completions", b"{}", 404),
            ("GET", "/completions", b"", 405),
            ("POST", "/completions", b"{" + b" " * (9 << 20) + b"}", 413),
        ]
        for method, path, data, status in cases:
            async with session.request(method, url + path, data=data) as reply:
                assert reply.status == status, (path, status)
                body = await reply.json()
                assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_models_are_404(client: AsyncOpenAI, stream: bool):
    for model in ("no-such-adapter", "../etc/passwd", "ad8@7"):
        error = await refused(client, model=model, max_tokens=4, stream=stream)
        assert isinstance(error, openai.NotFoundError), (model, error)
        assert error.code == "model_not_found" and error.param == "model"
        assert "neither the base model" in error.message or "does not exist" in error.message


async def test_full_router_queue_is_429_with_retry_after(served: Served):
    router = await served.stack.start_router(max_running=1, max_queued=0)
    front = await start_front(router.port)
    try:
        async with openai_client(front) as client:
            holder = await client.completions.create(
                model=BASE,
                prompt="hi",
                max_tokens=LONG,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            await anext(aiter(holder))  # the one running slot is taken
            for chat in (False, True):
                error = await refused(client, chat=chat, model="ad8", max_tokens=4)
                assert isinstance(error, openai.RateLimitError)
                assert error.code == "resource_exhausted"
                assert error.response.headers["retry-after"] == "1"
            await holder.close()
    finally:
        await front.stop()


async def test_no_worker_is_503(served: Served, client: AsyncOpenAI):
    await stop_worker(served.stack.workers[0])
    for stream in (False, True):
        error = await refused(client, model=BASE, max_tokens=4, stream=stream)
        assert isinstance(error, openai.InternalServerError)
        assert error.status_code == 503 and error.code == "unavailable"


async def test_unreachable_router_is_503(served: Served):
    front = await start_front(free_port())
    try:
        async with openai_client(front) as client:
            error = await refused(client, model=BASE, max_tokens=4)
            assert error.status_code == 503
            with pytest.raises(openai.InternalServerError) as err:
                await client.models.list()
            assert err.value.status_code == 503
    finally:
        await front.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_deadline_before_the_first_token_is_504(served: Served, stream: bool):
    front = await start_front(served.router.port, request_timeout_s=0.001)
    try:
        async with openai_client(front) as client:
            error = await refused(client, model="ad8", max_tokens=4, stream=stream)
            assert error.status_code == 504 and error.code == "deadline_exceeded"
    finally:
        await front.stop()


async def test_deadline_mid_generation_ends_it_and_frees_the_worker(served: Served):
    front = await start_front(served.router.port, request_timeout_s=0.5)
    try:
        async with openai_client(front) as client:
            whole = await refused(
                client, model="ad8", max_tokens=LONG, extra_body={"ignore_eos": True}
            )
            assert whole.status_code == 504 and whole.code == "deadline_exceeded"
            # Streamed, the 200 went out with the first token: the deadline is the last event.
            stream = await client.completions.create(
                model="ad8",
                prompt="hi",
                max_tokens=LONG,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            with pytest.raises(openai.APIError, match="Deadline") as err:
                async for _ in stream:
                    pass
            assert (
                isinstance(err.value.body, dict) and err.value.body["code"] == "deadline_exceeded"
            )
    finally:
        await front.stop()
    await poll_stats(served.stack.workers[0], lambda s: s.running_requests == s.kv_slots == 0)


async def test_an_error_mid_stream_is_the_last_event(served: Served, client: AsyncOpenAI):
    stream = await client.completions.create(
        model=BASE, prompt="hi", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = aiter(stream)
    await anext(chunks)
    await stop_worker(served.stack.workers[0])
    with pytest.raises(openai.APIError, match="incomplete"):
        async with asyncio.timeout(30):
            async for _ in chunks:
                pass
