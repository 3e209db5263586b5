"""One generation request, answered whole (JSON) or streamed (server-sent events ending
`data: [DONE]`).

A stream's HTTP status is sent with its first token, not before: until then every refusal of
the router (unknown adapter, full queue, no worker, deadline) still gets its own status and
OpenAI's error body. An error after that arrives as a last `data: {"error": ...}` event, which
OpenAI's client raises. A client that leaves cancels the handler's task (aiohttp's
`handler_cancellation`) or fails its next write; either way the router call is cancelled.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator

from aiohttp import web

from manylora.v1 import common_pb2
from services.common.metrics import StreamTracker
from services.openai_front.errors import ApiError
from services.openai_front.request_parsing import ParsedRequest
from services.openai_front.response_shapes import Shape, finish_reason
from services.openai_front.sse import DONE, SSE_HEADERS, sse_event

logger = logging.getLogger(__name__)

Responses = AsyncGenerator[common_pb2.GenerateResponse, None]


def _finished(response: common_pb2.GenerateResponse) -> bool:
    return response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


async def answer_whole(shape: Shape, responses: Responses, tracker: StreamTracker) -> web.Response:
    texts: list[str] = []
    token_ids: list[int] = []
    logprobs: list[float] = []
    last = None
    async for response in responses:
        tracker.on_response(response)
        texts.append(response.text)
        token_ids.extend(response.token_ids)
        logprobs.extend(response.logprobs)
        last = response
    if last is None or not _finished(last):
        raise ApiError(502, "the router ended the stream before its last message")
    body = shape.whole("".join(texts), token_ids, logprobs, finish_reason(last), last.usage)
    return web.json_response(body, dumps=lambda obj: json.dumps(obj, separators=(",", ":")))


async def answer_stream(
    request: web.Request,
    parsed: ParsedRequest,
    shape: Shape,
    responses: Responses,
    tracker: StreamTracker,
) -> web.StreamResponse:
    first = await _first(responses)  # an ApiError here is still a plain HTTP error
    stream = web.StreamResponse(headers=SSE_HEADERS)
    await stream.prepare(request)
    pending = b"".join(sse_event(chunk) for chunk in shape.opening_chunks())
    try:
        response: common_pb2.GenerateResponse | None = first
        while response is not None:
            tracker.on_response(response)
            chunk = shape.chunk(response)
            if parsed.include_usage:
                chunk["usage"] = None
            pending += sse_event(chunk)
            if _finished(response):
                if parsed.include_usage:
                    pending += sse_event(shape.usage_chunk(response.usage))
                break
            await stream.write(pending)
            pending = b""
            response = await anext(responses, None)
        else:
            raise ApiError(502, "the router ended the stream before its last message")
    except ApiError as exc:
        logger.info("stream ended with %d: %s", exc.status, exc.message)
        if exc.grpc_code is not None:
            tracker.fail(exc.grpc_code)
        pending += sse_event(exc.body())
    await stream.write(pending + DONE)
    await stream.write_eof()
    return stream


async def _first(responses: Responses) -> common_pb2.GenerateResponse:
    first = await anext(responses, None)
    if first is None:
        raise ApiError(502, "the router ended the stream before its first message")
    return first


@contextlib.asynccontextmanager
async def tracked(tracker: StreamTracker) -> AsyncGenerator[None, None]:
    """Record the request's outcome: the router's error code, or CANCELLED for a client that
    left (tracker.close)."""
    try:
        yield
    except ApiError as exc:
        if exc.grpc_code is not None:
            tracker.fail(exc.grpc_code)
        raise
    finally:
        tracker.close()
