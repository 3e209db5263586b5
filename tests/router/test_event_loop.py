"""The router runs on uvloop when it is installed (optional) and on asyncio's loop otherwise."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Coroutine
from typing import Any

import grpc
import pytest

from manylora.v1 import common_pb2, router_pb2_grpc
from services.router import __main__ as entry
from services.router.config import RouterConfig
from services.router.server import start_router
from tests.router.fakes import FakeWorker, serve_fake_worker


async def _loop_class() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_without_uvloop_asyncio_runs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    seen = []

    async def main() -> None:
        seen.append(await _loop_class())

    entry.run(main())
    assert seen and not seen[0].startswith("uvloop")


def test_with_uvloop_installed_its_run_is_used(monkeypatch):
    ran: list[Coroutine[Any, Any, None]] = []
    fake = types.ModuleType("uvloop")
    fake.__version__ = "0.0-test"  # type: ignore[attr-defined]

    def run(main: Coroutine[Any, Any, None]) -> None:
        ran.append(main)
        asyncio.run(main)

    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", fake)
    done = []

    async def main() -> None:
        done.append(True)

    entry.run(main())
    assert len(ran) == 1 and done == [True]


def test_the_router_relays_on_a_real_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[int]:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        fake = await serve_fake_worker(FakeWorker("a", tokens=5))
        router = await start_router(RouterConfig(port=0, workers=[fake.address]))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
                request = common_pb2.GenerateRequest(
                    prompt="hi", params=common_pb2.SamplingParams(max_new_tokens=5)
                )
                stub = router_pb2_grpc.RouterStub(channel)
                return [t async for r in stub.Generate(request, timeout=10) for t in r.token_ids]
        finally:
            await router.stop(None)
            assert fake.server is not None
            await fake.server.stop(None)

    assert uvloop.run(main()) == [10, 11, 12, 13, 14]
