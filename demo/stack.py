"""The whole stack on this machine, in this process: an adapter store on disk, one CPU worker
serving the demo's model and fetching adapters from the store, a router in front, and the
OpenAI-compatible HTTP front over the router."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from demo.artifacts import DemoModels
from manylora.v1 import common_pb2
from manylora.v1.adapter_store_pb2_grpc import AdapterStoreStub
from services.adapter_store.cli import upload
from services.adapter_store.config import AdapterStoreConfig
from services.adapter_store.server import start_store_server
from services.common.grpc_server import SERVER_OPTIONS
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.server import start_worker
from services.openai_front.config import OpenAIFrontConfig
from services.openai_front.server import start_openai_front
from services.router.config import RouterConfig
from services.router.server import start_router


@dataclass(frozen=True)
class Stack:
    store: str  # host:port of each service
    worker: str
    router: str
    openai_url: str  # base URL of the OpenAI-compatible API
    base_model: str  # the base model's name in that API's `model`
    uploaded: list[common_pb2.AdapterInfo]


def upload_adapters(
    store_target: str, adapter_dirs: dict[str, Path]
) -> list[common_pb2.AdapterInfo]:
    """Upload each PEFT folder through the store's API, as an operator would."""
    with grpc.insecure_channel(store_target, options=SERVER_OPTIONS) as channel:
        stub = AdapterStoreStub(channel)
        return [upload(stub, folder, name) for name, folder in adapter_dirs.items()]


@contextlib.asynccontextmanager
async def running_stack(
    models: DemoModels, tmp: Path, router_port: int = 0
) -> AsyncIterator[Stack]:
    """Store, worker, router and HTTP front on 127.0.0.1, stopped in reverse order on exit."""
    model = str(models.model_dir)
    async with contextlib.AsyncExitStack() as started:
        store = await start_store_server(
            AdapterStoreConfig(port=0, data_dir=str(tmp / "store"), base_model=model)
        )
        started.push_async_callback(store.stop)
        store_target = f"127.0.0.1:{store.port}"
        uploaded = await asyncio.to_thread(upload_adapters, store_target, models.adapter_dirs)
        worker = await start_worker(
            WorkerConfig(port=0, model=model, device="cpu", adapter_store=store_target)
        )
        started.push_async_callback(worker.stop)
        worker_target = f"127.0.0.1:{worker.port}"
        router = await start_router(
            RouterConfig(port=router_port, workers=[worker_target], adapter_store=store_target)
        )
        started.push_async_callback(router.stop)
        router_target = f"127.0.0.1:{router.port}"
        front = await start_openai_front(
            OpenAIFrontConfig(host="127.0.0.1", port=0, router=router_target, model=model)
        )
        started.push_async_callback(front.stop)
        yield Stack(store_target, worker_target, router_target, front.url, model, uploaded)
