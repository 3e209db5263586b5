"""The workers a router can send to: from configuration and from the Redis registry, each
polled for health and stats. Only healthy workers (and, for registered ones, workers whose
registration is alive) receive work."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from manylora.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc
from services.common.channels import ChannelSecurity, aio_channel
from services.common.grpc_server import SERVER_OPTIONS
from services.common.tasks import cancel_task
from services.router.registry import WorkerRegistry
from services.router.routing import Candidate

logger = logging.getLogger(__name__)

WORKER_SERVICE = gpu_worker_pb2.DESCRIPTOR.services_by_name["GpuWorker"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
# A worker that comes back is found within a poll or two, not after gRPC's default backoff.
CHANNEL_OPTIONS = [
    *SERVER_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
# The default worker liveness bound (RouterConfig.worker_liveness_timeout_s).
LIVENESS_TIMEOUT_S = 6.0


def channel_options(liveness_timeout_s: float) -> list[tuple[str, int]]:
    """Options of a channel to a worker. While streams are in flight, a ping goes out every
    half of `liveness_timeout_s` and must be answered within the other half, or the
    connection is closed and its streams end with UNAVAILABLE: a frozen worker (SIGSTOP, a
    hung host) keeps its TCP connection open and would otherwise hold them until their
    deadlines. The workers' servers accept pings this often (grpc_server.SERVER_OPTIONS)."""
    half_ms = max(1000, int(liveness_timeout_s * 500))
    return [
        *CHANNEL_OPTIONS,
        ("grpc.keepalive_time_ms", half_ms),
        ("grpc.keepalive_timeout_ms", half_ms),
        # gRPC core (1.6x+) times out an unanswered ping by this one, not the one above.
        ("grpc.http2.ping_timeout_ms", half_ms),
        ("grpc.keepalive_permit_without_calls", 0),  # idle workers are watched by health polls
        ("grpc.http2.max_pings_without_data", 0),  # a stream's request is sent only once
    ]


class WorkerHandle:
    """One worker: its channel, its last known stats, and this router's streams on it."""

    def __init__(
        self,
        address: str,
        static: bool,
        liveness_timeout_s: float = LIVENESS_TIMEOUT_S,
        security: ChannelSecurity | None = None,
    ):
        self.address = address
        self.static = static
        self.registered = static  # static workers need no registration
        self.healthy = False
        self.in_flight = 0
        self.stats: gpu_worker_pb2.GetStatsResponse | None = None
        self._in_flight_at_stats = 0
        # The stats' adapter lists as sets, made once per report, not once per request.
        self._on_gpu: frozenset[str] = frozenset()
        self._in_host: frozenset[str] = frozenset()
        self.channel = aio_channel(address, security, channel_options(liveness_timeout_s))
        self.stub = gpu_worker_pb2_grpc.GpuWorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def eligible(self) -> bool:
        return self.healthy and self.registered

    def update_stats(self, stats: gpu_worker_pb2.GetStatsResponse) -> None:
        self.stats = stats
        self._in_flight_at_stats = self.in_flight
        self._on_gpu = frozenset(stats.resident_adapters)
        self._in_host = frozenset(stats.host_cached_adapters)

    def load(self) -> int:
        """The worker's reported load (all routers' requests), moved by this router's own
        starts and ends since that report, which are fresher."""
        if self.stats is None:
            return self.in_flight
        reported = self.stats.running_requests + self.stats.waiting_requests
        return max(self.in_flight, reported + self.in_flight - self._in_flight_at_stats)

    def candidate(self) -> Candidate:
        return Candidate(self.address, self.load(), self._on_gpu, self._in_host)


class WorkerPool:
    def __init__(
        self,
        static: list[str],
        registry: WorkerRegistry | None,
        model: str,
        interval_s: float,
        timeout_s: float,
        liveness_timeout_s: float = LIVENESS_TIMEOUT_S,
        security: ChannelSecurity | None = None,
    ):
        self._liveness_timeout_s = liveness_timeout_s
        self._security = security  # TLS and the token of calls to workers
        self._workers = {
            address: WorkerHandle(address, True, liveness_timeout_s, security) for address in static
        }
        self._registry = registry
        self._model = model
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        # Awaited after each refresh with the number of eligible workers.
        self.on_change: Callable[[int], Awaitable[None]] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="worker-pool")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_task(self._task)
        for handle in self._workers.values():
            await handle.channel.close()
        if self._registry is not None:
            await self._registry.close()

    def eligible(self) -> list[WorkerHandle]:
        return [h for h in self._workers.values() if h.eligible]

    def counts(self) -> tuple[int, int]:
        """(eligible, known); safe from the metrics thread (list() of a dict is one step)."""
        handles = list(self._workers.values())
        return sum(1 for h in handles if h.eligible), len(handles)

    def mark_failed(self, handle: WorkerHandle, reason: str) -> None:
        """A call to the worker failed: no more work until a poll finds it healthy again."""
        self._set_health(handle, False, reason)

    async def refresh(self) -> None:
        """Discover, poll every worker once, and forget the ones gone for good."""
        if self._registry is not None:
            await self._discover(self._registry)
        await asyncio.gather(*(self._poll(h) for h in list(self._workers.values())))
        await self._drop_departed()
        if self.on_change is not None:
            await self.on_change(len(self.eligible()))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh()
            except Exception:
                logger.exception("refreshing the worker pool failed")

    async def _discover(self, registry: WorkerRegistry) -> None:
        live = await registry.read()
        if live is None:  # Redis unreadable: health polls alone decide until it is back
            return
        for address, stats in live.items():
            handle = self._workers.get(address)
            if handle is None:
                handle = self._workers[address] = WorkerHandle(
                    address, False, self._liveness_timeout_s, self._security
                )
                handle.update_stats(stats)
                logger.info("worker %s registered (model %s)", address, stats.model)
            handle.registered = True
        for handle in self._workers.values():
            if not handle.static and handle.address not in live and handle.registered:
                handle.registered = False
                logger.warning("worker %s: registration expired; no more work", handle.address)

    async def _drop_departed(self) -> None:
        # Streams still running on a departed worker keep its channel until they end.
        for handle in list(self._workers.values()):
            if not handle.registered and handle.in_flight == 0:
                del self._workers[handle.address]
                await handle.channel.close()

    async def _poll(self, handle: WorkerHandle) -> None:
        check = health_pb2.HealthCheckRequest(service=WORKER_SERVICE)
        try:
            health, stats = await asyncio.gather(
                handle.health.Check(check, timeout=self._timeout_s),
                handle.stub.GetStats(gpu_worker_pb2.GetStatsRequest(), timeout=self._timeout_s),
            )
        except grpc.aio.AioRpcError as exc:
            self._set_health(handle, False, f"poll failed: {exc.code().name}")
            return
        handle.update_stats(stats)
        if health.status != SERVING:
            self._set_health(handle, False, "health check says NOT_SERVING")
        elif self._model and stats.model != self._model:
            self._set_health(handle, False, f"serves {stats.model!r}, not {self._model!r}")
        else:
            self._set_health(handle, True, "")

    @staticmethod
    def _set_health(handle: WorkerHandle, healthy: bool, reason: str) -> None:
        if healthy != handle.healthy:
            if healthy:
                logger.info("worker %s healthy", handle.address)
            else:
                logger.warning("worker %s unhealthy: %s", handle.address, reason)
        handle.healthy = healthy
