"""OpenTelemetry traces across router -> worker -> store, off by default.

`--otel-endpoint` (`MANYLORA_OTEL_ENDPOINT`, on every service) turns them on: an OTLP/gRPC
collector's URL (`http://collector:4317`; `https://` for TLS), or `console` to print spans on
stderr. Empty (the default) is off: OpenTelemetry is then never imported, no interceptor is
installed, and the hooks below return after one context-variable read. The packages are the
`tracing` extra (`pip install 'manylora[tracing]'`); a service asked to trace without them
stops at start with one line naming the flag.

What is traced, with the W3C `traceparent` carried in each call's gRPC metadata:

- every served RPC is a SERVER span (a server interceptor), child of the caller's span when the
  call carries one: the router's Generate, the worker's Generate, the store's GetAdapterInfo and
  FetchAdapter;
- every call a service makes on behalf of a traced RPC is a CLIENT span (a channel interceptor):
  router -> worker (a retry is a second one), router -> store, worker -> store. Background calls
  (health and stats polls, heartbeats) carry no trace;
- inside the worker's Generate, `record_engine_phases` adds `queue_wait`, `prefill` and
  `decode` spans from the engine's own timestamps and `first_token` and `done` events; the
  router's servicer marks admission and its routing choice with `add_event`.

Each service has its own tracer provider (its spans name their service), which is what makes
three services in one process (the tests, the demo) trace as three. The tracer of the RPC being
served travels in a context variable, so a hook knows whom it traces for without arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc

from services.common.config import ConfigError
from services.common.logging import request_id_var
from services.common.rpc_names import split_method

if TYPE_CHECKING:  # only imported when tracing is on: the packages are optional
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger(__name__)

FIELD = "otel_endpoint"
CONSOLE = "console"
# Health checks, reflection and routers' load polls are probes and tools, not requests: a
# span each would bury the requests' traces.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
UNTRACED_METHODS = ("/manylora.v1.GpuWorker/GetStats",)
# Request fields copied onto the server span when the request has them.
_REQUEST_ATTRIBUTES = {
    "adapter_id": "manylora.adapter_id",
    "adapter_version": "manylora.adapter_version",
    "version": "manylora.adapter_version",
}

# The tracer of the service whose RPC this task serves; None outside traced RPCs.
_tracer_var: ContextVar[Tracer | None] = ContextVar("manylora_tracer", default=None)
# Whether any service of this process traces: only then do client channels get interceptors.
_started = False
# Client spans being ended (asyncio keeps only weak references to tasks).
_ending: set[asyncio.Task[None]] = set()


def otel_endpoint_field() -> Any:
    """`--otel-endpoint`, the same in every service."""
    return dataclasses.field(
        default="",
        metadata={
            "help": "OpenTelemetry traces: an OTLP/gRPC collector URL (http://host:4317, "
            "https:// for TLS) or 'console' (stderr); the W3C traceparent travels in gRPC "
            "metadata between services; empty = off (needs the 'tracing' extra when on)"
        },
    )


def check_endpoint(endpoint: str) -> None:
    """`ConfigError` naming --otel-endpoint for a value that cannot work."""
    if endpoint in ("", CONSOLE):
        return
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("http", "https") or not rest.strip("/"):
        raise ConfigError(FIELD, f"{endpoint!r} is neither 'console' nor http(s)://host:port")


def check_tracing(endpoint: str) -> None:
    """At start-up, before anything runs: a bad --otel-endpoint, or one given without the
    packages, is a `ConfigError` naming the flag (nothing is imported)."""
    check_endpoint(endpoint)
    if not endpoint:
        return
    needed = ["opentelemetry.sdk"]
    if endpoint != CONSOLE:
        needed.append("opentelemetry.exporter.otlp.proto.grpc")
    for module in needed:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            raise ConfigError(
                FIELD, f"tracing needs {module} (pip install 'manylora[tracing]'), not installed"
            )


def make_exporter(endpoint: str) -> SpanExporter:
    """The exporter of `endpoint` (tests replace this function with an in-memory one)."""
    if endpoint == CONSOLE:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            FIELD,
            "exporting to a collector needs opentelemetry-exporter-otlp-proto-grpc "
            "(pip install 'manylora[tracing]')",
        ) from None
    return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


class Tracing:
    """One service's tracer provider: its server interceptor, and `stop` to flush."""

    def __init__(self, provider: Any, service_name: str):
        self._provider = provider
        self.service_name = service_name
        self.tracer: Tracer = provider.get_tracer("manylora")

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _ServerSpans(self.tracer)

    def flush(self) -> None:
        """Export what is buffered now (blocking)."""
        self._provider.force_flush()

    async def stop(self) -> None:
        """Export what is buffered and stop (idempotent)."""
        await asyncio.to_thread(self._provider.shutdown)


def start_tracing(endpoint: str, service_name: str) -> Tracing | None:
    """The service's tracing when `endpoint` is set, else None (and nothing imported)."""
    global _started
    if not endpoint:
        return None
    check_endpoint(endpoint)
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            FIELD, "tracing needs opentelemetry-sdk (pip install 'manylora[tracing]')"
        ) from None
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES; the SDK reads OTEL_TRACES_SAMPLER.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(make_exporter(endpoint)))
    _started = True
    logger.info("tracing to %s as %s", endpoint, service_name)
    return Tracing(provider, service_name)


def client_interceptors(target: str) -> list[Any]:
    """Interceptors of a channel to `target`: none unless some service here traces."""
    if not _started:
        return []
    kinds = (_ClientUnaryUnary, _ClientUnaryStream, _ClientStreamUnary, _ClientStreamStream)
    return [kind(target) for kind in kinds]


def add_event(name: str, **attributes: str | int | float | bool) -> None:
    """An event on the span of the RPC being served; nothing when it is not traced."""
    if _tracer_var.get() is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, attributes)


def record_engine_phases(
    arrival: float, scheduled_at: float | None, first_token_at: float | None
) -> None:
    """The worker's phases of one request as child spans of its Generate span, from the
    engine's monotonic timestamps: queue_wait (arrival to admission), prefill (admission to
    the first token), decode (first token to now); plus `first_token` and `done` events."""
    tracer = _tracer_var.get()
    if tracer is None:
        return
    from opentelemetry import trace

    now = time.monotonic()
    offset_ns = time.time_ns() - int(now * 1e9)

    def wall(t: float) -> int:
        return offset_ns + int(t * 1e9)

    def phase(name: str, start: float, end: float) -> None:
        tracer.start_span(name, start_time=wall(start)).end(end_time=wall(end))

    phase("queue_wait", arrival, scheduled_at or now)
    if scheduled_at is not None:
        phase("prefill", scheduled_at, first_token_at or now)
    span = trace.get_current_span()
    if first_token_at is not None:
        phase("decode", first_token_at, now)
        span.add_event("first_token", timestamp=wall(first_token_at))
    span.add_event("done", timestamp=wall(now))


def _metadata_carrier(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {k: v if isinstance(v, str) else v.decode(errors="replace") for k, v in metadata or ()}


def _rpc_attributes(method: str) -> dict[str, str]:
    service, name = split_method(method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class _ServerSpans(grpc.aio.ServerInterceptor):
    """A SERVER span around every served call but probes, child of the caller's traceparent."""

    def __init__(self, tracer: Tracer):
        self._tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        service = split_method(method)[0]
        if handler is None or service in UNTRACED_SERVICES or method in UNTRACED_METHODS:
            return handler
        metadata = handler_call_details.invocation_metadata
        return _traced_handler(handler, self._tracer, method, _metadata_carrier(metadata))


def _traced_handler(
    handler: grpc.RpcMethodHandler, tracer: Tracer, method: str, carrier: dict[str, str]
) -> grpc.RpcMethodHandler:
    """`handler` with its behavior run inside a server span (each of the four kinds)."""
    from opentelemetry import propagate, trace

    @contextlib.contextmanager
    def span(request: Any, context: grpc.aio.ServicerContext) -> Iterator[Span]:
        parent = propagate.extract(carrier)
        with tracer.start_as_current_span(
            method.strip("/"),
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=_rpc_attributes(method),
            record_exception=False,
            set_status_on_exception=False,
        ) as current:
            for name, key in _REQUEST_ATTRIBUTES.items():
                value = getattr(request, name, None)
                if isinstance(value, str | int) and value not in ("", 0):
                    current.set_attribute(key, value)
            token = _tracer_var.set(tracer)
            try:
                yield current
            except asyncio.CancelledError:
                current.set_status(trace.StatusCode.ERROR, "CANCELLED")
                raise
            finally:
                # A stream closed from another context (garbage collection) cannot reset it.
                with contextlib.suppress(ValueError):
                    _tracer_var.reset(token)
                _end_server_span(current, context)

    def wrap_unary(behavior: Any) -> Any:
        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with span(request, context):
                return await behavior(request, context)

        return traced

    def wrap_stream(behavior: Any) -> Any:
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write
            return wrap_unary(behavior)

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with span(request, context):
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

        return traced

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), **serializers
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), **serializers
        )
    return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **serializers)


def _end_server_span(span: Span, context: grpc.aio.ServicerContext) -> None:
    from opentelemetry import trace

    rid = request_id_var.get()
    if rid != "-":
        span.set_attribute("manylora.request_id", rid)
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(trace.StatusCode.ERROR, code.name)


class _ClientSpans:
    """A CLIENT span per call made while serving a traced RPC, its traceparent in the call's
    metadata; calls outside one (polls, heartbeats) go through untouched."""

    def __init__(self, target: str):
        self._target = target

    def _start(self, details: grpc.aio.ClientCallDetails) -> tuple[Span | None, Any]:
        tracer = _tracer_var.get()
        if tracer is None:
            return None, details
        from opentelemetry import propagate, trace

        method = details.method if isinstance(details.method, str) else details.method.decode()
        attributes = {**_rpc_attributes(method), "server.address": self._target}
        span = tracer.start_span(
            method.strip("/"), kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
        return span, details._replace(metadata=metadata)

    async def _call(self, continuation: Any, details: Any, request: Any) -> Any:
        span, details = self._start(details)
        if span is None:
            return await continuation(details, request)
        try:
            call = await continuation(details, request)
        except BaseException:
            span.end()
            raise
        call.add_done_callback(lambda done: _end_later(span, done))
        return call


def _end_later(span: Span, call: Any) -> None:
    task = asyncio.ensure_future(_end_client_span(span, call))
    _ending.add(task)
    task.add_done_callback(_ending.discard)


async def _end_client_span(span: Span, call: Any) -> None:
    from opentelemetry import trace

    try:
        code = await call.code()
    except (asyncio.CancelledError, grpc.RpcError):
        code = grpc.StatusCode.CANCELLED
    if code != grpc.StatusCode.OK:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(trace.StatusCode.ERROR, code.name)
    span.end()


# grpc.aio files an interceptor under the first call kind it implements, so each kind has
# its own class (as in services.common.channels).
class _ClientUnaryUnary(_ClientSpans, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _ClientUnaryStream(_ClientSpans, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _ClientStreamUnary(_ClientSpans, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._call(continuation, details, requests)


class _ClientStreamStream(_ClientSpans, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._call(continuation, details, requests)
