"""The real stack on the CPU (store, one dummy CPU worker, router; tests/e2e's Stack) with the
HTTP front in front of the router, and the official `openai` client pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from services.client import AsyncManyloraClient
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.random_adapters import save_random_peft_adapter
from services.openai_front.config import OpenAIFrontConfig
from services.openai_front.server import OpenAIFront, start_openai_front
from services.router.server import RouterServer
from tests.e2e.stack import Stack, stack_at

BASE = "tiny"  # the worker's --model, and so the front's
ADAPTERS = {"ad8": (8, 1), "ad16": (16, 2)}  # id: (rank, seed)


@dataclass
class Served:
    stack: Stack
    router: RouterServer
    front: OpenAIFront

    @property
    def router_target(self) -> str:
        return f"127.0.0.1:{self.router.port}"


async def start_front(router_port: int, **overrides: Any) -> OpenAIFront:
    fields: dict[str, Any] = {
        "port": 0,
        "router": f"127.0.0.1:{router_port}",
        "model": BASE,
        **overrides,
    }
    return await start_openai_front(OpenAIFrontConfig(**fields))


def openai_client(front: OpenAIFront, **overrides: Any) -> AsyncOpenAI:
    """No retries: a test sees each error as the front sent it."""
    fields: dict[str, Any] = {"max_retries": 0, "timeout": 60.0, "api_key": "unused", **overrides}
    return AsyncOpenAI(base_url=front.url, **fields)


async def serve(stack: Stack, tmp: Path, **router_overrides: Any) -> Served:
    await stack.start_store()
    shape = BaseModelShape.from_hf_config(load_hf_config(BASE))
    await stack.upload(
        {
            name: save_random_peft_adapter(tmp / name, shape, rank, seed=seed)
            for name, (rank, seed) in ADAPTERS.items()
        }
    )
    await stack.start_worker()
    router = await stack.start_router(**router_overrides)
    return Served(stack, router, await start_front(router.port))


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async for running in stack_at(tmp_path):
        yield running


@pytest.fixture
async def served(stack: Stack, tmp_path: Path) -> AsyncIterator[Served]:
    running = await serve(stack, tmp_path)
    try:
        yield running
    finally:
        await running.front.stop()


@pytest.fixture
async def client(served: Served) -> AsyncIterator[AsyncOpenAI]:
    async with openai_client(served.front) as openai:
        yield openai


@pytest.fixture
async def grpc_client(served: Served) -> AsyncIterator[AsyncManyloraClient]:
    async with AsyncManyloraClient(served.router_target, timeout=60) as manylora:
        yield manylora
