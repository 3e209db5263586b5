"""Assemble the store from its config and serve it over gRPC, health included."""

from __future__ import annotations

import asyncio
import logging

import grpc
import torch
from grpc_health.v1 import health_pb2
from prometheus_client import Gauge

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc
from services.adapter_store.config import AdapterStoreConfig
from services.adapter_store.disk_store import DiskStore
from services.adapter_store.redis_cache import RedisCache
from services.adapter_store.service import AdapterStoreService, UploadBudget, UploadLimits
from services.adapter_store.store import AdapterStore
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.config import ConfigError
from services.common.grpc_server import RunningServer, start_server
from services.common.metrics import PREFIX, MetricsServer, rpc_registry, start_metrics_server
from services.common.tracing import Tracing, start_tracing

logger = logging.getLogger(__name__)

SERVICE_NAME = adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].full_name
# Health of the hot copy alone: NOT_SERVING while Redis is down, when the store itself still
# serves from disk. Not registered when no Redis is configured.
REDIS_HEALTH_NAME = SERVICE_NAME + ".redis"


class StoreServer:
    def __init__(
        self,
        store: AdapterStore,
        running: RunningServer,
        metrics_server: MetricsServer | None = None,
        tracing: Tracing | None = None,
    ):
        self.store = store
        self.tracing = tracing
        self.running = running
        self.metrics_server = metrics_server

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = 2.0) -> None:
        await self.running.stop(grace)
        await self.store.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
        if self.tracing is not None:
            await self.tracing.stop()


def build_store(config: AdapterStoreConfig) -> AdapterStore:
    shape = BaseModelShape.from_hf_config(load_hf_config(config.base_model))
    cache = None
    if config.redis_url:
        try:
            cache = RedisCache(
                config.redis_url,
                config.redis_max_bytes,
                config.redis_key_prefix,
                config.redis_retry_s,
            )
        except ValueError as exc:  # redis-py reads the URL here
            raise ConfigError("redis_url", f"{config.redis_url!r}: {exc}") from None
    name = config.store_dtype.lower()  # the config takes its words in any case
    dtype = None if name == "as-uploaded" else getattr(torch, name)
    return AdapterStore(DiskStore(config.data_dir), shape, config.max_rank, cache, dtype)


async def start_store_server(config: AdapterStoreConfig) -> StoreServer:
    """Read the data folder, connect Redis (up or not), then start serving; with a metrics
    port, Prometheus metrics of every call (and of Redis) on it."""
    metrics_port = config.metrics_port
    store = build_store(config)
    try:
        await store.open()
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot use {config.data_dir}: {exc}") from None
    limits = UploadLimits(
        config.max_upload_bytes,
        UploadBudget(config.max_upload_bytes_in_flight),
        config.upload_idle_timeout_s,
    )
    service = AdapterStoreService(store, config.fetch_chunk_bytes, limits)
    descriptor = adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"]
    registry = rpc_registry(service, descriptor) if metrics_port else None

    def add_service(server: grpc.aio.Server) -> None:
        adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server(service, server)

    tracing = start_tracing(config.otel_endpoint, "manylora-adapter-store")
    try:
        running = await start_server(
            [add_service], [SERVICE_NAME], config.host, config.port, config, tracing
        )
    except BaseException:
        await store.close()
        if tracing is not None:
            await tracing.stop()
        raise
    cache = store.cache
    if cache is not None:

        async def report(available: bool) -> None:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if available
                else (health_pb2.HealthCheckResponse.NOT_SERVING)
            )
            await running.health.set(REDIS_HEALTH_NAME, status)

        cache.on_state_change = report
        await report(cache.available)
    logger.info(
        "base model %s, max rank %d, data in %s",
        config.base_model,
        config.max_rank,
        config.data_dir,
    )
    server = StoreServer(store, running, None, tracing)
    if registry is not None:
        if cache is not None:
            up = Gauge(PREFIX + "store_redis_up", "1 while Redis is reachable.", registry=registry)
            up.set_function(lambda: float(cache.available))
        try:  # a taken metrics port stops what already runs
            server.metrics_server = start_metrics_server(metrics_port, registry, config.host)
        except BaseException:
            await server.stop(0)
            raise
    return server
