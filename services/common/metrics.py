"""Prometheus metrics: the HTTP endpoint every service serves, and the per-request metrics that
the router and the worker share, named as vLLM and TGI users expect (`manylora:` prefix).

Each service instance keeps its own registry, so that several services in one process (tests,
`make run`) do not mix their numbers.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from manylora.v1 import common_pb2
from services.common.config import ConfigError

PREFIX = "manylora:"

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsServer:
    """A running `/metrics` HTTP endpoint (prometheus_client's, on its own thread)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread):
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, registry: CollectorRegistry, host: str) -> MetricsServer:
    """Serve /metrics; `ConfigError` naming --metrics-port when it cannot listen there."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            "metrics_port", f"cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    return MetricsServer(server, thread)


S = TypeVar("S")
# Called once per call: its start time, its context, and the exception it ended with.
Recorder = Callable[[float, grpc.aio.ServicerContext, BaseException | None], None]


class RpcMetrics:
    """Calls and their durations for every method of a gRPC service, by status code."""

    def __init__(self, registry: CollectorRegistry):
        self.calls = Counter(
            PREFIX + "rpc_requests",
            "gRPC calls handled, by service, method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            PREFIX + "rpc_duration_seconds",
            "Seconds from the start of a gRPC call to its end.",
            ["service", "method"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )

    def instrument(self, servicer: S, service: ServiceDescriptor) -> S:
        """Wrap each of `service`'s methods on `servicer` (before it is added to a server)."""
        for method in service.methods:
            handler = getattr(servicer, method.name)
            wrap = _wrap_stream if method.server_streaming else _wrap_unary
            setattr(servicer, method.name, wrap(handler, self._recorder(service, method.name)))
        return servicer

    def _recorder(self, service: ServiceDescriptor, method: str) -> Recorder:
        def record(
            start: float, context: grpc.aio.ServicerContext, error: BaseException | None
        ) -> None:
            code = context.code()
            if code is None:
                code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
            if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the client left
                code = grpc.StatusCode.CANCELLED
            self.calls.labels(service.name, method, code.name).inc()
            self.duration.labels(service.name, method).observe(time.monotonic() - start)

        return record


def rpc_registry(servicer: Any, service: ServiceDescriptor) -> CollectorRegistry:
    """A registry counting `servicer`'s calls (instrumented in place)."""
    registry = CollectorRegistry()
    RpcMetrics(registry).instrument(servicer, service)
    return registry


def _wrap_unary(handler: Callable[..., Awaitable[Any]], record: Recorder) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.monotonic()
        try:
            reply = await handler(request, context)
        except BaseException as exc:
            record(start, context, exc)
            raise
        record(start, context, None)
        return reply

    return wrapped


def _wrap_stream(
    handler: Callable[..., AsyncIterator[Any]], record: Recorder
) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        start = time.monotonic()
        try:
            async for reply in handler(request, context):
                yield reply
        except BaseException as exc:
            record(start, context, exc)
            raise
        record(start, context, None)

    return wrapped


class BoundedLabels:
    """Label values for per-adapter series, so that their number stays bounded whatever ids
    clients send: the first `limit` adapters that finish a request successfully get a label
    of their own (for good: a counter must not move to another series); every other adapter
    counts under OTHER, and requests without an adapter under BASE. An id that only ever
    fails (unknown, refused) never takes a label, so made-up ids cannot use them up.
    Per-adapter numbers beyond the limit are in the request summaries of the logs."""

    # Parentheses are not allowed in adapter ids (services.common.ids): no id can take these.
    OTHER = "(other)"
    BASE = "(base)"

    def __init__(self, limit: int):
        self.limit = limit
        self._own: set[str] = set()

    def label(self, adapter_id: str, succeeded: bool) -> str:
        if not adapter_id:
            return self.BASE
        if adapter_id in self._own:
            return adapter_id
        if succeeded and len(self._own) < self.limit:
            self._own.add(adapter_id)
            return adapter_id
        return self.OTHER


class TokenHistogram(Histogram):
    """A Histogram that also takes `count` equal observations at once (`observe_many`): the
    tokens of one merged message share one gap, and observing them one by one cost a relay a
    bucket search and two locked increments per token. It updates Histogram's own bucket and
    sum values (prometheus_client internals, alike since 0.8; tests/common/test_metrics.py
    holds it to `count` calls of `observe`)."""

    def observe_many(self, amount: float, count: int) -> None:
        self._raise_if_not_observable()
        self._sum.inc(amount * count)
        # observe() counts `amount` in the first bucket whose bound is >= it (the last is +Inf).
        self._buckets[bisect.bisect_left(self._upper_bounds, amount)].inc(count)


class GenerationMetrics:
    """Request outcomes, latencies and token counts of Generate streams."""

    def __init__(self, registry: CollectorRegistry):
        self.success = Counter(
            PREFIX + "request_success",
            "Generate requests that finished, by finish reason.",
            ["finished_reason"],
            registry=registry,
        )
        self.failure = Counter(
            PREFIX + "request_failure",
            "Generate requests that ended with an error status, by gRPC code.",
            ["code"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from arrival to the first generated token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = TokenHistogram(
            PREFIX + "inter_token_latency_seconds",
            "Seconds between consecutive generated tokens (one sample per token).",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Seconds from arrival to the last token of finished requests.",
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Seconds a request waited in this service's queue before it started.",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated (rate = tokens/s).", registry=registry
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", registry=registry
        )

    def track(self, queue_time_from_usage: bool = False) -> StreamTracker:
        return StreamTracker(self, queue_time_from_usage)


class StreamTracker:
    """Follows one Generate stream: feed it each response, then `close` it exactly once."""

    def __init__(self, metrics: GenerationMetrics, queue_time_from_usage: bool):
        self._m = metrics
        # Where the service's queue is inside the engine, the wait is known only from usage.
        self._queue_time_from_usage = queue_time_from_usage
        self._start = time.monotonic()
        self._last_token_at: float | None = None
        self._outcome_recorded = False

    def on_response(self, response: common_pb2.GenerateResponse) -> common_pb2.GenerateResponse:
        """Record one response on its way out; returns it."""
        now = time.monotonic()
        count = len(response.token_ids)
        if count:
            if self._last_token_at is None:
                self._m.time_to_first_token.observe(now - self._start)
            else:
                # Tokens grouped in one message arrived together: share the gap among them.
                gap = (now - self._last_token_at) / count
                self._m.inter_token_latency.observe_many(gap, count)
            self._last_token_at = now
            self._m.generation_tokens.inc(count)
        if response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self._finished(response, now)
        return response

    def _finished(self, response: common_pb2.GenerateResponse, now: float) -> None:
        reason = common_pb2.FinishReason.Name(response.finish_reason).lower()
        self._m.success.labels(reason).inc()
        self._m.prompt_tokens.inc(response.usage.prompt_tokens)
        self._m.e2e_latency.observe(now - self._start)
        if self._queue_time_from_usage:
            self._m.queue_time.observe(response.usage.queue_time_ms / 1000.0)
        self._outcome_recorded = True

    def fail(self, code: grpc.StatusCode) -> None:
        if not self._outcome_recorded:
            self._m.failure.labels(code.name).inc()
            self._outcome_recorded = True

    def close(self) -> None:
        """End of the stream: one that neither finished nor failed was cancelled."""
        self.fail(grpc.StatusCode.CANCELLED)
