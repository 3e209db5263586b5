"""The exporter the flag really uses: spans sent over OTLP/gRPC reach a collector (a fake one
in this process, speaking the collector's protocol), named by their service."""

from __future__ import annotations

import grpc
import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")

from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from services.common.grpc_server import free_port
from services.common.tracing import start_tracing


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_collector(monkeypatch: pytest.MonkeyPatch):
    from services.common import tracing

    monkeypatch.setattr(tracing, "_started", False)
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        traced = start_tracing(f"http://127.0.0.1:{port}", "manylora-router")
        assert traced is not None
        with traced.tracer.start_as_current_span("one"):
            pass
        await traced.stop()  # exports what is buffered
    finally:
        await server.stop(None)
    spans = [
        (resource.resource, span.name)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert [name for _, name in spans] == ["one"]
    attributes = {a.key: a.value.string_value for a in spans[0][0].attributes}
    assert attributes["service.name"] == "manylora-router"
