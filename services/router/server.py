"""Assemble a router from its config and serve it, health and metrics included."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2

from manylora.v1 import router_pb2, router_pb2_grpc
from services.common.grpc_server import RunningServer, start_server, wait_for_signal_then
from services.common.metrics import MetricsServer, start_metrics_server
from services.common.tracing import Tracing, start_tracing
from services.common.validation import add_servicer_leniently
from services.router.adapter_catalog import AdapterCatalog
from services.router.admission import Admission
from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.registry import WorkerRegistry
from services.router.servicer import RouterServicer
from services.router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class RouterServer:
    def __init__(
        self,
        running: RunningServer,
        pool: WorkerPool,
        catalog: AdapterCatalog | None,
        metrics: RouterMetrics,
        metrics_server: MetricsServer | None,
        tracing: Tracing | None = None,
    ):
        self.running = running
        self.tracing = tracing
        self.pool = pool
        self.metrics = metrics
        self._catalog = catalog
        self.metrics_server = metrics_server

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = 2.0) -> None:
        await self.running.set_serving([SERVICE_NAME], False)
        await self.running.stop(grace)
        await self.pool.stop()
        if self._catalog is not None:
            await self._catalog.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
        if self.tracing is not None:
            await self.tracing.stop()


def _check(config: RouterConfig) -> None:
    if config.load_bound < 1:
        raise ValueError(f"load_bound must be >= 1, got {config.load_bound}")
    if config.worker_liveness_timeout_s < 2:
        raise ValueError(
            f"worker_liveness_timeout_s must be >= 2, got {config.worker_liveness_timeout_s}"
        )
    if not config.workers and not config.registry_redis_url:
        raise ValueError("give --workers or --registry-redis-url (or both)")


async def start_router(config: RouterConfig) -> RouterServer:
    """Start serving, then find and poll the workers once before returning."""
    _check(config)
    config.check_security()  # before anything starts: a bad file is one line naming its flag
    tracing = start_tracing(config.otel_endpoint, "manylora-router")  # before any channel
    callee_security = config.channel_security("router")
    registry = None
    if config.registry_redis_url:
        registry = WorkerRegistry(
            config.registry_redis_url, config.registry_prefix, config.health_timeout_s
        )
    pool = WorkerPool(
        config.workers,
        registry,
        config.model,
        config.health_interval_s,
        config.health_timeout_s,
        config.worker_liveness_timeout_s,
        callee_security,
    )
    admission = Admission(config.max_running, config.max_queued)
    catalog = None
    if config.adapter_store:
        catalog = AdapterCatalog(
            config.adapter_store, config.adapter_cache_ttl_s, security=callee_security
        )
    metrics = RouterMetrics(admission, pool, config.metrics_adapter_labels)
    servicer = RouterServicer(
        pool, admission, catalog, metrics, config.load_bound, config.min_load_bound
    )
    running = await start_server(
        [
            lambda s: add_servicer_leniently(
                router_pb2_grpc.add_RouterServicer_to_server, servicer, s
            )
        ],
        [SERVICE_NAME],
        config.host,
        config.port,
        config,
        tracing,
    )

    async def report_readiness(healthy_workers: int) -> None:
        # The Router service is ready while some worker can take work; "" stays SERVING
        # (the process is alive), which is what liveness probes ask.
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy_workers
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        await running.health.set(SERVICE_NAME, status)

    pool.on_change = report_readiness
    router = RouterServer(running, pool, catalog, metrics, None, tracing)
    try:  # a later start-up failure (a taken metrics port) stops what already runs
        await pool.start()
        if config.metrics_port:
            router.metrics_server = start_metrics_server(
                config.metrics_port, metrics.registry, config.host
            )
    except BaseException:
        await router.stop(0)
        raise
    return router


async def serve(config: RouterConfig) -> None:
    router = await start_router(config)
    await wait_for_signal_then(router.stop)
