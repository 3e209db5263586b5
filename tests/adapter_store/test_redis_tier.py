"""The hot copy in Redis: filled at upload, refilled on reads, bounded by its budget, and
never needed: the store serves from disk while Redis is down and refills it once back."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc
from services.adapter_store.server import REDIS_HEALTH_NAME, SERVICE_NAME
from tests.adapter_store.helpers import (
    aio_channel,
    as_stream,
    read_adapter,
    store_config,
    upload_requests,
)

PREFIX = "manylora:store:"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def entry_key(adapter_id: str, version: int = 1) -> str:
    return f"{PREFIX}adapter:{adapter_id}:v{version}"


async def _upload(stub, adapter_id: str, folder: Path):
    config_json, weights = read_adapter(folder)
    return await stub.UploadAdapter(as_stream(upload_requests(adapter_id, config_json, weights)))


async def _fetch_blob(stub, adapter_id: str) -> bytes:
    request = adapter_store_pb2.FetchAdapterRequest(adapter_id=adapter_id)
    return b"".join([chunk.data async for chunk in stub.FetchAdapter(request)])


async def _wait_for_health(health, service: str, status: int, within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        if reply.status == status:
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{service} stayed {reply.status}, expected {status}")
        await asyncio.sleep(0.05)


def _count_disk_reads(server) -> list[int]:
    reads = [0]
    read_blob = server.store.disk.read_blob

    def counting(adapter_id: str, version: int) -> bytes:
        reads[0] += 1
        return read_blob(adapter_id, version)

    server.store.disk.read_blob = counting
    return reads


async def test_redis_killed_store_serves_from_disk_and_refills_when_back(
    tmp_path: Path, qv_adapter: Path, start_store, redis_proc, redis_client
) -> None:
    server = await start_store(store_config(tmp_path / "data", redis_url=redis_proc.url))
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        info = await _upload(stub, "a", qv_adapter)
        assert await redis_client.exists(entry_key("a")) == 1
        await _wait_for_health(health, REDIS_HEALTH_NAME, SERVING)

        redis_proc.kill()
        during = await _fetch_blob(stub, "a")
        uploaded_during = await _upload(stub, "b", qv_adapter)
        await _wait_for_health(health, REDIS_HEALTH_NAME, NOT_SERVING)
        await _wait_for_health(health, SERVICE_NAME, SERVING, within_s=0)

        redis_proc.start()  # same port, empty
        await _wait_for_health(health, REDIS_HEALTH_NAME, SERVING)
        await redis_client.connection_pool.disconnect()  # the test's own client, to the new one
        assert await redis_client.exists(entry_key("a"), entry_key("b")) == 0
        after = await _fetch_blob(stub, "a")
        await _fetch_blob(stub, "b")
        refilled = await redis_client.exists(entry_key("a"), entry_key("b"))

    assert hashlib.sha256(during).hexdigest() == info.sha256
    assert after == during
    assert uploaded_during.version == 1
    assert refilled == 2
    assert await redis_client.hget(entry_key("a"), "blob") == during


async def test_redis_budget_evicts_least_recently_used_and_hot_reads_skip_disk(
    tmp_path: Path, qv_adapter: Path, start_store, redis_proc, redis_client
) -> None:
    config = store_config(tmp_path / "data", redis_url=redis_proc.url)
    probe = await start_store(config)
    async with aio_channel(probe.port) as channel:
        await _upload(adapter_store_pb2_grpc.AdapterStoreStub(channel), "a", qv_adapter)
    entry_bytes = int(await redis_client.hget(f"{PREFIX}sizes", entry_key("a")))
    await probe.stop()
    await redis_client.flushall()

    config = store_config(
        tmp_path / "data2", redis_url=redis_proc.url, redis_max_bytes=entry_bytes * 5 // 2
    )
    server = await start_store(config)
    reads = _count_disk_reads(server)
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        await _upload(stub, "a", qv_adapter)
        await _upload(stub, "b", qv_adapter)
        await _fetch_blob(stub, "a")  # a becomes the most recently used
        await _upload(stub, "c", qv_adapter)  # over budget: b goes
        present_after_c = [await redis_client.exists(entry_key(i)) for i in "abc"]
        disk_reads_while_hot = reads[0]
        await _fetch_blob(stub, "b")  # from disk, back into Redis: a is now the oldest
        present_after_b = [await redis_client.exists(entry_key(i)) for i in "abc"]
    total = int(await redis_client.get(f"{PREFIX}bytes"))

    assert present_after_c == [1, 0, 1]
    assert disk_reads_while_hot == 0
    assert reads[0] == 1
    assert present_after_b == [0, 1, 1]
    assert total == 2 * entry_bytes <= entry_bytes * 5 // 2


async def test_delete_removes_both_tiers(
    tmp_path: Path, qv_adapter: Path, start_store, redis_proc, redis_client
) -> None:
    data_dir = tmp_path / "data"
    server = await start_store(store_config(data_dir, redis_url=redis_proc.url))
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        await _upload(stub, "x", qv_adapter)
        await _upload(stub, "x", qv_adapter)
        before = await redis_client.exists(entry_key("x", 1), entry_key("x", 2))
        await stub.DeleteAdapter(adapter_store_pb2.DeleteAdapterRequest(adapter_id="x"))
    after = await redis_client.exists(entry_key("x", 1), entry_key("x", 2))

    assert before == 2
    assert after == 0
    assert await redis_client.zcard(f"{PREFIX}lru") == 0
    assert int(await redis_client.get(f"{PREFIX}bytes")) == 0
    assert not list((data_dir / "x").glob("v*"))
