"""Small in-process stand-ins for GPU workers and the adapter store, on real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2

from manylora.v1 import (
    adapter_store_pb2,
    adapter_store_pb2_grpc,
    common_pb2,
    gpu_worker_pb2,
    gpu_worker_pb2_grpc,
)
from services.common.errors import FAILURE_SCOPE_KEY
from services.common.grpc_server import RunningServer, start_server
from services.router.worker_pool import WORKER_SERVICE


@dataclass
class Seen:
    """What a fake worker saw of one Generate call."""

    request: common_pb2.GenerateRequest
    time_remaining: float | None
    cancelled: bool = False
    finished: bool = False


class FakeWorker(gpu_worker_pb2_grpc.GpuWorkerServicer):
    """Streams `tokens` one-token messages. `gate`, when set, holds every stream after its
    first message until it is opened. `fail_first` calls fail before any message with that
    code; `fail_after` fails every call after that many messages. `waiting` is the queue its
    stats report (requests of other routers waiting there)."""

    def __init__(self, name: str, tokens: int = 3, model: str = "tiny"):
        self.name = name
        self.tokens = tokens
        self.model = model
        self.resident: list[str] = []
        self.host_cached: list[str] = []
        self.waiting = 0
        self.gate: asyncio.Event | None = None
        self.fail_first: list[grpc.StatusCode] = []
        # Failure scope the fail_first aborts carry (errors.FAILURE_SCOPE_KEY); None: none.
        self.fail_scope: str | None = None
        self.fail_after: int | None = None
        self.seen: list[Seen] = []
        self.open_streams = 0
        self.server: RunningServer | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    async def Generate(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        seen = Seen(request, context.time_remaining())
        self.seen.append(seen)
        if self.fail_first:
            scope = () if self.fail_scope is None else ((FAILURE_SCOPE_KEY, self.fail_scope),)
            await context.abort(
                self.fail_first.pop(0), f"{self.name} refuses", trailing_metadata=scope
            )
        self.open_streams += 1
        try:
            for i in range(self.tokens):
                if self.fail_after is not None and i == self.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} broke down")
                last = i == self.tokens - 1
                response = _response(request.request_id, i, self.name, last)
                # A worker reports the version that serves the request: here, the asked one.
                response.adapter_version = request.adapter_version or int(bool(request.adapter_id))
                yield response
                if i == 0 and self.gate is not None:
                    await self.gate.wait()
            seen.finished = True
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        finally:
            self.open_streams -= 1

    async def GetStats(
        self, request: gpu_worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.GetStatsResponse:
        return gpu_worker_pb2.GetStatsResponse(
            running_requests=self.open_streams,
            waiting_requests=self.waiting,
            resident_adapters=self.resident,
            host_cached_adapters=self.host_cached,
            model=self.model,
            free_slots=100,
            total_slots=100,
        )

    async def set_serving(self, serving: bool) -> None:
        assert self.server is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        await self.server.health.set(WORKER_SERVICE, status)


def _response(request_id: str, index: int, name: str, last: bool) -> common_pb2.GenerateResponse:
    response = common_pb2.GenerateResponse(
        request_id=request_id, token_ids=[index + 10], text=f"{name}{index} "
    )
    if last:
        response.finish_reason = common_pb2.LENGTH
        response.usage.completion_tokens = index + 1
        response.usage.prompt_tokens = 2
    return response


async def serve_fake_worker(fake: FakeWorker) -> FakeWorker:
    fake.server = await start_server(
        [lambda s: gpu_worker_pb2_grpc.add_GpuWorkerServicer_to_server(fake, s)],
        [WORKER_SERVICE],
        "127.0.0.1",
        0,
    )
    return fake


@dataclass
class FakeStore(adapter_store_pb2_grpc.AdapterStoreServicer):
    """Knows the adapters in `known`; counts GetAdapterInfo calls."""

    known: set[str] = field(default_factory=set)
    info_calls: int = 0
    down: bool = False

    async def GetAdapterInfo(
        self, request: adapter_store_pb2.GetAdapterInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.AdapterInfo:
        self.info_calls += 1
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "store is down")
        if request.adapter_id not in self.known or request.version > 1:  # only v1 exists
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter {request.adapter_id!r}")
        return common_pb2.AdapterInfo(adapter_id=request.adapter_id, version=1, rank=8)

    async def ListAdapters(
        self, request: common_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListAdaptersResponse:
        infos = [common_pb2.AdapterInfo(adapter_id=a, version=1) for a in sorted(self.known)]
        return common_pb2.ListAdaptersResponse(adapters=infos)


async def serve_fake_store(fake: FakeStore) -> RunningServer:
    return await start_server(
        [lambda s: adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server(fake, s)],
        ["manylora.v1.AdapterStore"],
        "127.0.0.1",
        0,
    )
