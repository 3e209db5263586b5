"""`python -m services.common.healthcheck`, as the containers run it, against a router whose
readiness follows its workers."""

from __future__ import annotations

import asyncio

from services.common.grpc_server import free_port
from services.common.healthcheck import main as healthcheck


async def run(*argv: str) -> int:
    return await asyncio.to_thread(healthcheck, list(argv))


async def until_status(argv: tuple[str, ...], status: int, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while await run(*argv) != status:
            await asyncio.sleep(0.05)


async def test_router_is_ready_while_a_worker_is(start_fakes, start_router_for, capsys):
    (worker,) = await start_fakes(1)
    router = await start_router_for([worker])
    target = f"127.0.0.1:{router.port}"
    assert await run(target, "manylora.v1.Router") == 0
    assert "SERVING" in capsys.readouterr().out
    await worker.set_serving(False)
    await until_status((target, "manylora.v1.Router"), 1)
    assert "NOT_SERVING" in capsys.readouterr().err
    assert await run(target) == 0  # the process itself is alive
    await worker.set_serving(True)
    await until_status((target, "manylora.v1.Router"), 0)


async def test_unreachable_server_is_unhealthy(capsys):
    assert await run(f"127.0.0.1:{free_port()}", "--timeout", "0.5") == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err
