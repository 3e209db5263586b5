"""Worker registration in a real Redis (a private redis-server on a free port): routers find
registered workers, stop choosing one whose heartbeat expires, and a stopped worker leaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import redis.asyncio

from manylora.v1 import common_pb2, gpu_worker_pb2, router_pb2_grpc
from services.common.grpc_server import free_port
from services.common.worker_record import REGISTRY_PREFIX, decode_record, encode_record
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.heartbeat import Heartbeat
from services.gpu_worker.serving.server import start_worker
from tests.adapter_store.helpers import RedisProcess


async def until(predicate, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_expired_heartbeat_stops_a_worker_being_chosen(
    redis_proc: RedisProcess, start_fakes, start_router_for
):
    a, b = await start_fakes(2)
    a.resident = ["x"]
    client = redis.asyncio.Redis.from_url(redis_proc.url)
    # a registers once and then goes silent, as a worker whose process hung would.
    stats_a = gpu_worker_pb2.GetStatsResponse(model="tiny", resident_adapters=["x"])
    await client.set(REGISTRY_PREFIX + a.address, encode_record(a.address, stats_a), px=800)
    # b keeps beating (every 0.1 s, each registration living 0.4 s).
    beat_b = Heartbeat(
        redis_proc.url, b.address, lambda: gpu_worker_pb2.GetStatsResponse(model="tiny"), 0.1, 0.4
    )
    await beat_b.start()
    try:
        router = await start_router_for([], registry_redis_url=redis_proc.url)
        assert {h.address for h in router.pool.eligible()} == {a.address, b.address}
        async with router_channel(router.port) as stub:
            await generate(stub, "x")
            assert len(a.seen) == 1  # a holds x
            await until(lambda: [h.address for h in router.pool.eligible()] == [b.address])
            await generate(stub, "x")
            assert (len(a.seen), len(b.seen)) == (1, 1)
        # b's registration outlived many of its 0.4 s lifetimes: the beats renew it.
        assert await client.exists(REGISTRY_PREFIX + b.address)
    finally:
        await beat_b.stop()
        await client.aclose()
    await until(lambda: not router.pool.eligible())  # b deregistered on stop


async def test_a_worker_registers_with_its_stats_and_leaves_on_stop(redis_proc: RedisProcess):
    config = WorkerConfig(
        port=0,
        device="cpu",
        registry_redis_url=redis_proc.url,
        heartbeat_interval_s=0.1,
        heartbeat_ttl_s=1.0,
    )
    worker = await start_worker(config)
    key = f"{REGISTRY_PREFIX}127.0.0.1:{worker.port}"
    client = redis.asyncio.Redis.from_url(redis_proc.url)
    try:
        record = await client.get(key)
        assert record is not None
        address, stats = decode_record(record)
        assert address == f"127.0.0.1:{worker.port}"
        assert stats.model == "tiny" and stats.total_slots > 0
        ttl_ms = await client.pttl(key)
        assert 0 < ttl_ms <= 1000
        await worker.stop()
        assert not await client.exists(key)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def router_channel(port: int) -> AsyncIterator[router_pb2_grpc.RouterStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield router_pb2_grpc.RouterStub(channel)


async def generate(stub: router_pb2_grpc.RouterStub, adapter: str) -> None:
    request = common_pb2.GenerateRequest(
        adapter_id=adapter, prompt="hi", params=common_pb2.SamplingParams(max_new_tokens=3)
    )
    responses = [r async for r in stub.Generate(request, timeout=10)]
    assert responses[-1].finish_reason == common_pb2.LENGTH


async def test_redis_down_breaks_neither_worker_nor_router(start_fakes, start_router_for):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    config = WorkerConfig(port=0, device="cpu", registry_redis_url=dead, heartbeat_interval_s=0.1)
    worker = await start_worker(config)  # registration fails, logged; the worker serves
    try:
        (fake,) = await start_fakes(1)
        router = await start_router_for(
            [f"127.0.0.1:{worker.port}", fake.address], registry_redis_url=dead
        )
        assert len(router.pool.eligible()) == 2  # configured workers need no registry
        async with router_channel(router.port) as stub:
            for _ in range(2):
                await generate(stub, "")
    finally:
        await worker.stop()
