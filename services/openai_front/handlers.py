"""The HTTP routes: completions, chat completions, the model list, and health; plus the
middleware that gives every request its id, its log line, its metrics and, for any failure,
OpenAI's error body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from services.common.errors import InvalidArgument
from services.common.logging import REQUEST_ID_KEY, request_id_var
from services.common.validation import check_request_id
from services.openai_front.config import OpenAIFrontConfig
from services.openai_front.errors import ApiError, bad_request
from services.openai_front.generation import answer_stream, answer_whole, tracked
from services.openai_front.metrics import CLIENT_CLOSED, FrontMetrics
from services.openai_front.request_parsing import ParsedRequest, parse_chat, parse_completion
from services.openai_front.response_shapes import ChatShape, CompletionShape, Shape
from services.openai_front.router_client import RouterClient

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Routes:
    def __init__(self, config: OpenAIFrontConfig, router: RouterClient, metrics: FrontMetrics):
        self._config = config
        self._router = router
        self._metrics = metrics

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_completion(await _json_body(request), self._config.model)
        return await self._generate(request, parsed, CompletionShape(parsed.model, parsed.logprobs))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        parsed = parse_chat(body, self._config.model, self._config.default_max_tokens)
        return await self._generate(request, parsed, ChatShape(parsed.model, parsed.logprobs))

    async def _generate(
        self, request: web.Request, parsed: ParsedRequest, shape: Shape
    ) -> web.StreamResponse:
        parsed.generate.request_id = request_id_var.get()
        tracker = self._metrics.generation.track()
        responses = self._router.generate(
            parsed.generate,
            self._config.request_timeout_s,
            request.headers.get("Authorization", ""),
        )
        self._metrics.running.inc()
        try:
            async with tracked(tracker), contextlib.aclosing(responses):
                if parsed.stream:
                    return await answer_stream(request, parsed, shape, responses, tracker)
                return await answer_whole(shape, responses, tracker)
        except ApiError as exc:
            if exc.status == 404:  # the store does not know the adapter the model names
                exc.message = (
                    f"model {parsed.model!r} is neither the base model {self._config.model!r} "
                    f"nor an adapter the router knows: {exc.message}"
                )
            raise
        finally:
            self._metrics.running.dec()

    async def models(self, request: web.Request) -> web.Response:
        base = self._config.model
        listed: list[dict[str, Any]] = [_model_json(base, None, None)]
        for info in (
            await self._router.list_adapters(request.headers.get("Authorization", "")) or ()
        ):
            listed.append(_model_json(info.adapter_id, base, info.version))
        return web.json_response({"object": "list", "data": listed})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def _model_json(name: str, parent: str | None, version: int | None) -> dict[str, Any]:
    model: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": 0,  # the store keeps no upload time
        "owned_by": "manylora",
        "root": name,
        "parent": parent,
    }
    if version is not None:
        model["version"] = version  # the newest; `name@N` pins another
    return model


async def _json_body(request: web.Request) -> dict[str, Any]:
    data = await request.read()  # bounded by the app's client_max_size (413 beyond)
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _route_name(request: web.Request) -> str:
    """The matched route's path, or `other`: a label that callers cannot multiply."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "other"


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers())


def make_middleware(metrics: FrontMetrics) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.monotonic()
        status = 500
        try:
            response = await _handle(request, handler)
            status = response.status
            return response
        except (asyncio.CancelledError, ConnectionError):
            status = CLIENT_CLOSED
            raise
        finally:
            seconds = time.monotonic() - start
            metrics.observe(_route_name(request), status, seconds)
            logger.info("%s %s -> %d in %.3f s", request.method, request.path, status, seconds)

    return middleware


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The request's task (aiohttp's, one per connection) keeps its id in the context
    # variable every log line reads, until the connection's next request sets its own.
    given = request.headers.get(REQUEST_ID_KEY, "")
    request_id_var.set(uuid.uuid4().hex)
    try:
        if given:
            try:
                check_request_id(given)
            except InvalidArgument as exc:
                raise bad_request(f"header {REQUEST_ID_KEY}: {exc}", REQUEST_ID_KEY) from None
            request_id_var.set(given)
        return await handler(request)
    except ApiError as exc:
        if exc.status >= 500:
            logger.warning("%d: %s", exc.status, exc.message)
        return _error_response(exc)
    except web.HTTPException as exc:  # no such route or method, a body over the bound
        code = exc.reason.lower().replace(" ", "_")
        return _error_response(ApiError(exc.status, exc.reason, code=code))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        logger.exception("failed")
        return _error_response(ApiError(500, "internal error of the HTTP front"))


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed or not, carries its request's id."""
    response.headers[REQUEST_ID_KEY] = request_id_var.get()
