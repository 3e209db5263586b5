from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from services.router.config import RouterConfig
from services.router.server import RouterServer, start_router
from tests.adapter_store.conftest import redis_proc
from tests.router.fakes import FakeWorker, serve_fake_worker

__all__ = ["redis_proc"]  # a private redis-server on a free port, for the registry tests

StartRouter = Callable[..., Awaitable[RouterServer]]
StartFakes = Callable[..., Awaitable[list[FakeWorker]]]


@pytest.fixture
async def start_fakes() -> AsyncIterator[StartFakes]:
    """Start fake workers named a, b, ...; all stop at the end of the test."""
    started: list[FakeWorker] = []

    async def start(count: int, **options: Any) -> list[FakeWorker]:
        fakes = []
        for _ in range(count):
            fake = await serve_fake_worker(FakeWorker(chr(ord("a") + len(started)), **options))
            started.append(fake)
            fakes.append(fake)
        return fakes

    yield start
    for fake in started:
        assert fake.server is not None
        fake.gate = None
        await fake.server.stop(grace=None)


@pytest.fixture
async def start_router_for() -> AsyncIterator[StartRouter]:
    """Start routers (port 0, quick polls unless told); all stop at the end of the test."""
    routers: list[RouterServer] = []

    async def start(workers: list[FakeWorker] | list[str], **overrides: Any) -> RouterServer:
        addresses = [w if isinstance(w, str) else w.address for w in workers]
        fields: dict[str, Any] = {
            "port": 0,
            "workers": addresses,
            "health_interval_s": 0.1,
            "health_timeout_s": 1.0,
            **overrides,
        }
        router = await start_router(RouterConfig(**fields))
        routers.append(router)
        return router

    yield start
    for router in routers:
        await router.stop(grace=None)
