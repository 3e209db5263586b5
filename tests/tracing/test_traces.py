"""OpenTelemetry traces across the real services (in this process, on the CPU): one request
through router, worker and store is one trace whose spans link caller to callee through the
W3C traceparent in gRPC metadata; with tracing off, no span is made and no tracing path runs."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from manylora.v1 import common_pb2, router_pb2_grpc
from services.common import tracing
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.config import ConfigError, load_config
from services.common.random_adapters import save_random_peft_adapter
from services.router.config import RouterConfig
from tests.e2e.stack import Stack

ROUTER, WORKER, STORE = "manylora-router", "manylora-gpu-worker", "manylora-adapter-store"


class SharedExporter(InMemorySpanExporter):
    """One exporter for three services: the first to stop must not close it for the others."""

    def shutdown(self) -> None:
        pass


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Every service that traces exports here; channels lose their interceptors afterwards."""
    exporter = SharedExporter()
    monkeypatch.setattr(tracing, "make_exporter", lambda endpoint: exporter)
    monkeypatch.setattr(tracing, "_started", False)
    return exporter


async def stop_and_flush(stack: Stack) -> None:
    await stack.stop()  # router and store flush their spans as they stop
    for worker in stack.workers:  # stopped there as a crash would: nothing flushed
        assert worker.tracing is not None
        worker.tracing.flush()


def service(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def one(spans: list[ReadableSpan], name: str, where: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and service(s) == where and s.kind == kind]
    assert len(found) == 1, (name, where, kind, [(s.name, service(s)) for s in spans])
    return found[0]


def attributes(span: ReadableSpan) -> Mapping[str, Any]:
    return span.attributes or {}


def interval(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None and span.end_time is not None
    return span.start_time, span.end_time


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_request_is_one_trace_router_worker_store(
    stack: Stack, tmp_path: Path, exported: InMemorySpanExporter
):
    on: dict[str, Any] = {"otel_endpoint": "console"}  # the exporter is the in-memory one
    await stack.start_store(**on)
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    await stack.upload({"ad": save_random_peft_adapter(tmp_path / "ad", shape, 8, seed=3)})
    await stack.start_worker(**on)
    router = await stack.start_router(**on)
    request = common_pb2.GenerateRequest(
        request_id="traced-1",
        adapter_id="ad",
        prompt="hello there",
        params=common_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        responses = [r async for r in router_pb2_grpc.RouterStub(channel).Generate(request)]
    assert responses[-1].finish_reason == common_pb2.LENGTH
    await stop_and_flush(stack)

    spans = list(exported.get_finished_spans())
    root = one(spans, "manylora.v1.Router/Generate", ROUTER, SpanKind.SERVER)
    trace_id = root.context.trace_id
    mine = [s for s in spans if s.context.trace_id == trace_id]
    assert root.parent is None
    assert attributes(root)["manylora.adapter_id"] == "ad"
    assert attributes(root)["manylora.request_id"] == "traced-1"
    assert [e.name for e in root.events] == ["admitted", "routed"]

    # router -> worker
    call = one(mine, "manylora.v1.GpuWorker/Generate", ROUTER, SpanKind.CLIENT)
    served = one(mine, "manylora.v1.GpuWorker/Generate", WORKER, SpanKind.SERVER)
    assert parent_of(call) == root.context.span_id
    assert parent_of(served) == call.context.span_id
    assert attributes(call)["server.address"] == f"127.0.0.1:{stack.workers[0].port}"
    assert attributes(served)["manylora.request_id"] == "traced-1"
    # the worker's phases, in order, inside its Generate span
    phases = {s.name: s for s in mine if parent_of(s) == served.context.span_id}
    order = [phases[name] for name in ("queue_wait", "prefill", "decode")]
    assert all(service(s) == WORKER for s in order)
    assert interval(served)[0] <= interval(order[0])[0]
    for earlier, later in itertools.pairwise(order):
        assert interval(earlier)[1] <= interval(later)[0] + 1000  # ns: rounding of two clocks
    assert interval(order[-1])[1] <= interval(served)[1]
    assert [e.name for e in served.events] == ["first_token", "done"]

    # worker -> store: the fetch of the adapter, inside the worker's Generate
    fetch = one(mine, "manylora.v1.AdapterStore/FetchAdapter", WORKER, SpanKind.CLIENT)
    stored = one(mine, "manylora.v1.AdapterStore/FetchAdapter", STORE, SpanKind.SERVER)
    assert parent_of(fetch) == served.context.span_id
    assert parent_of(stored) == fetch.context.span_id
    assert attributes(stored)["manylora.adapter_id"] == "ad"
    # router -> store: the router's check that the adapter exists
    check = one(mine, "manylora.v1.AdapterStore/GetAdapterInfo", ROUTER, SpanKind.CLIENT)
    assert parent_of(check) == root.context.span_id
    assert any(
        parent_of(s) == check.context.span_id and service(s) == STORE and s.kind == SpanKind.SERVER
        for s in mine
    )
    assert all(s.status.status_code != StatusCode.ERROR for s in mine)
    # Polls, heartbeats and health checks are not part of any request's trace.
    assert not [s for s in spans if "Health" in s.name or "GetStats" in s.name]


async def test_a_refused_request_is_traced_with_its_status(
    stack: Stack, exported: InMemorySpanExporter
):
    on: dict[str, Any] = {"otel_endpoint": "console"}
    await stack.start_store(**on)
    await stack.start_worker(**on)
    router = await stack.start_router(**on)
    request = common_pb2.GenerateRequest(
        adapter_id="nope", prompt="hi", params=common_pb2.SamplingParams(max_new_tokens=2)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in router_pb2_grpc.RouterStub(channel).Generate(request):
                pass
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    await stop_and_flush(stack)
    spans = list(exported.get_finished_spans())
    root = one(spans, "manylora.v1.Router/Generate", ROUTER, SpanKind.SERVER)
    assert root.status.status_code == StatusCode.ERROR
    assert attributes(root)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    stored = one(spans, "manylora.v1.AdapterStore/GetAdapterInfo", STORE, SpanKind.SERVER)
    assert stored.context.trace_id == root.context.trace_id
    assert not [s for s in spans if s.name == "manylora.v1.GpuWorker/Generate"]


async def test_tracing_off_makes_no_span_and_takes_no_tracing_path(
    stack: Stack, tmp_path: Path, exported: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
):
    """The flag unset (the default): every tracing path beyond the first check raises here,
    so a request that takes one fails; and no span reaches the exporter."""

    def taken(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tracing path was taken with tracing off")

    monkeypatch.setattr(tracing, "_traced_handler", taken)  # server spans
    monkeypatch.setattr(tracing._ClientSpans, "_call", taken)  # client spans, injection
    monkeypatch.setattr(trace, "get_current_span", taken)  # the servicers' hooks
    await stack.start_store()
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    await stack.upload({"ad": save_random_peft_adapter(tmp_path / "ad", shape, 8, seed=3)})
    await stack.start_worker()
    router = await stack.start_router()
    request = common_pb2.GenerateRequest(
        adapter_id="ad", prompt="hello", params=common_pb2.SamplingParams(max_new_tokens=3)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        responses = [r async for r in router_pb2_grpc.RouterStub(channel).Generate(request)]
    assert responses[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert all(w.tracing is None for w in stack.workers)
    await stack.stop()
    assert not tracing._started
    assert exported.get_finished_spans() == ()


def test_the_flag_is_checked_at_start(monkeypatch: pytest.MonkeyPatch):
    def check(*argv: str) -> None:
        load_config(RouterConfig, ["--workers", "127.0.0.1:1", *argv], env={}).check()

    check()  # off by default
    check("--otel-endpoint", "http://collector:4317")
    with pytest.raises(ConfigError, match=r"--otel-endpoint \(MANYLORA_OTEL_ENDPOINT\)"):
        check("--otel-endpoint", "collector:4317")
    monkeypatch.setattr(tracing.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"--otel-endpoint.*manylora\[tracing\]"):
        check("--otel-endpoint", "console")
