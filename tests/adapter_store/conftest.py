from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio

from services.adapter_store.config import AdapterStoreConfig
from services.adapter_store.server import StoreServer, start_store_server
from tests.adapter_store.helpers import RedisProcess, make_peft_adapter

StartStore = Callable[[AdapterStoreConfig], Awaitable[StoreServer]]


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    proc = RedisProcess(workdir)
    proc.start()
    yield proc
    proc.kill()


@pytest.fixture
async def redis_client(redis_proc: RedisProcess) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_proc.url)
    yield client
    await client.aclose()


@pytest.fixture
async def start_store() -> AsyncIterator[StartStore]:
    """Start stores in this process; all of them stop at the end of the test."""
    servers: list[StoreServer] = []

    async def start(config: AdapterStoreConfig) -> StoreServer:
        server = await start_store_server(config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=None)


@pytest.fixture(scope="session")
def qv_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain PEFT adapter on q_proj and v_proj, r=8, made once for the session."""
    folder = tmp_path_factory.mktemp("adapters") / "qv"
    make_peft_adapter(folder, seed=1)
    return folder
