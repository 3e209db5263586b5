"""The whole stack in this process on free ports: a disk-only store, CPU workers fetching from
it, and a router in front. Every server stops when the test ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from manylora.v1 import (
    adapter_store_pb2,
    adapter_store_pb2_grpc,
    gpu_worker_pb2,
    gpu_worker_pb2_grpc,
)
from services.adapter_store.server import StoreServer, start_store_server
from services.common.grpc_server import free_port
from services.common.peft_adapter import CONFIG_FILE, WEIGHTS_FILE
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.server import Worker, start_worker
from services.router.config import RouterConfig
from services.router.server import RouterServer, start_router
from tests.adapter_store.helpers import aio_channel, as_stream, store_config, upload_requests


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.store: StoreServer | None = None
        self.workers: list[Worker] = []
        self.routers: list[RouterServer] = []

    @property
    def store_address(self) -> str:
        assert self.store is not None
        return f"127.0.0.1:{self.store.port}"

    async def start_store(self, metrics_port: int = 0, **overrides: Any) -> StoreServer:
        config = store_config(self.tmp / "store", metrics_port=metrics_port, **overrides)
        self.store = await start_store_server(config)
        return self.store

    async def upload(self, folders: dict[str, Path]) -> None:
        """Upload PEFT folders to the store under the given ids."""
        assert self.store is not None
        async with aio_channel(self.store.port) as channel:
            stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
            for adapter_id, folder in folders.items():
                config_json = (folder / CONFIG_FILE).read_text()
                weights = (folder / WEIGHTS_FILE).read_bytes()
                await stub.UploadAdapter(
                    as_stream(upload_requests(adapter_id, config_json, weights))
                )

    async def delete(self, adapter_id: str) -> None:
        assert self.store is not None
        async with aio_channel(self.store.port) as channel:
            stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
            await stub.DeleteAdapter(adapter_store_pb2.DeleteAdapterRequest(adapter_id=adapter_id))

    async def start_worker(self, **overrides: Any) -> Worker:
        fields: dict[str, Any] = {
            "port": 0,
            "device": "cpu",
            "model": "tiny",
            "adapter_store": self.store_address,
            **overrides,
        }
        worker = await start_worker(WorkerConfig(**fields))
        self.workers.append(worker)
        return worker

    async def start_router(self, **overrides: Any) -> RouterServer:
        fields: dict[str, Any] = {
            "port": 0,
            "workers": [f"127.0.0.1:{w.port}" for w in self.workers],
            "adapter_store": self.store_address,
            "health_interval_s": 0.2,
            **overrides,
        }
        router = await start_router(RouterConfig(**fields))
        self.routers.append(router)
        return router

    async def stop(self) -> None:
        for router in self.routers:
            await router.stop(grace=None)
        for worker in self.workers:
            await stop_worker(worker)
        if self.store is not None:
            await self.store.stop(grace=None)


async def stop_worker(worker: Worker) -> None:
    """Stop a worker at once, as a crash would look to its callers (idempotent)."""
    await worker.server.stop(None)
    for close in worker.closers:
        await close()
    worker.closers.clear()
    worker.engine.stop()


async def worker_stats(worker: Worker) -> gpu_worker_pb2.GetStatsResponse:
    async with aio_channel(worker.port) as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        stats: gpu_worker_pb2.GetStatsResponse = await stub.GetStats(
            gpu_worker_pb2.GetStatsRequest(), timeout=5
        )
        return stats


async def poll_stats(worker: Worker, predicate: Any, timeout_s: float = 10.0) -> Any:
    """The worker's stats once `predicate(stats)` holds; fails after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            stats = await worker_stats(worker)
            if predicate(stats):
                return stats
            await asyncio.sleep(0.02)


async def stack_at(tmp: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp)
    try:
        yield stack
    finally:
        await stack.stop()


__all__ = ["Stack", "free_port", "poll_stats", "stack_at", "stop_worker", "worker_stats"]
