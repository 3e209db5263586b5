"""Adapter versions across the store, the router and two workers.

One id gets new weights while it is being served: each upload must reach both workers within
a bound (at once through the store's Redis notices; within the workers' TTL without Redis),
a stream running when a new version lands must finish on its own version, a pinned version
must keep serving, and a deleted then re-uploaded id must serve the new weights. Every token
is checked against HF + PEFT on the weights of the version that the response says served it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from manylora.v1 import common_pb2, gpu_worker_pb2_grpc
from services.client import AsyncManyloraClient, ManyloraError
from services.common.base_model import DUMMY_PRESETS
from services.gpu_worker.engine.engine_loop import EngineLoop
from services.gpu_worker.serving.server import Worker
from tests.adapter_store.helpers import RedisProcess, aio_channel
from tests.e2e.stack import Stack, worker_stats
from tests.e2e.test_oracle_streams import one_torch_thread
from tests.oracle import AdapterSpec, build_pair, greedy_oracle, make_peft_adapters

pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted")

ID = "ver"
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
# Three sets of weights uploaded one after another under the one id.
SPECS = (
    AdapterSpec("w1", 8, 16, QKVO),
    AdapterSpec("w2", 8, 32, QKVO),
    AdapterSpec("w3", 16, 16, ("q_proj", "v_proj")),
)
PROMPT = [5, 77, 140, 9, 201]
NEW_TOKENS = 6
LONG_TOKENS = 500  # a stream that is still running while a new version is uploaded
NOTICE_BOUND_S = 5.0  # with Redis notices; far under the TTL those workers run with


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory):
    """The PEFT folders, HF + PEFT's tokens for PROMPT under each, and the long stream's."""
    _, hf = build_pair(DUMMY_PRESETS["tiny"], seed=0)  # the workers' dummy "tiny", seed 0
    peft_model, folders = make_peft_adapters(hf, SPECS, tmp_path_factory.mktemp("peft"), seed=2)
    with one_torch_thread():
        expected = {s.name: greedy_oracle(peft_model, PROMPT, s.name, NEW_TOKENS)[0] for s in SPECS}
        long = greedy_oracle(peft_model, PROMPT, "w1", LONG_TOKENS)[0]
    assert len({tuple(t) for t in expected.values()}) == len(SPECS), "weights too alike"
    return folders, expected, long


def _request(
    adapter: str, version: int = 0, tokens: int = NEW_TOKENS
) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        adapter_id=adapter,
        adapter_version=version,
        prompt_token_ids=common_pb2.PromptTokenIds(ids=PROMPT),
        params=common_pb2.SamplingParams(max_new_tokens=tokens, ignore_eos=True),
    )


async def on_worker(worker: Worker, adapter: str, version: int = 0) -> tuple[int, list[int]]:
    """(the version that served it, its tokens) for one request sent to `worker` directly."""
    async with aio_channel(worker.port) as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        versions: set[int] = set()
        tokens: list[int] = []
        async for response in stub.Generate(_request(adapter, version), timeout=30):
            versions.add(response.adapter_version)
            tokens += response.token_ids
    assert len(versions) == 1, f"one stream reported versions {versions}"
    return versions.pop(), tokens


async def served_within(worker: Worker, version: int, bound_s: float) -> list[int]:
    """Tokens of the first request for ID that `worker` serves on `version`, which must
    happen within `bound_s`."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            served, tokens = await on_worker(worker, ID)
            if served == version:
                return tokens
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        assert time.monotonic() < deadline, f"v{version} not served within {bound_s} s"
        await asyncio.sleep(0.05)


async def gone_within(worker: Worker, bound_s: float) -> None:
    deadline = time.monotonic() + bound_s
    while True:
        try:
            await on_worker(worker, ID)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise
        assert time.monotonic() < deadline, f"deleted {ID} still served after {bound_s} s"
        await asyncio.sleep(0.05)


async def check_versions(
    stack: Stack, oracle, bound_s: float, worker_overrides: dict[str, Any]
) -> None:
    folders, expected, long = oracle
    await stack.upload({ID: folders["w1"]})
    workers = [await stack.start_worker(**worker_overrides) for _ in range(2)]
    router = await stack.start_router()
    for worker in workers:  # both resolve v1 and cache it
        assert await on_worker(worker, ID) == (1, expected["w1"])

    async with AsyncManyloraClient(f"127.0.0.1:{router.port}", timeout=60) as client:
        # A long stream on v1, running while v2 lands.
        stream = client.generate(PROMPT, adapter=ID, max_new_tokens=LONG_TOKENS, ignore_eos=True)
        first = await anext(stream)
        assert first.adapter_version == 1

        await stack.upload({ID: folders["w2"]})
        for worker in workers:
            assert await served_within(worker, 2, bound_s) == expected["w2"]
        running = sum([(await worker_stats(w)).running_requests for w in workers])
        assert running == 1, "the long stream ended before v2 was served: make it longer"

        chunks = [first] + [chunk async for chunk in stream]
        assert [t for c in chunks for t in c.token_ids] == long
        assert {c.adapter_version for c in chunks} == {1}

        # Newest through the router, and a pinned old version, both ways of pinning.
        done = await client.complete(PROMPT, adapter=ID, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert (done.adapter_version, done.token_ids) == (2, expected["w2"])
        for pinned in ({"adapter": f"{ID}@1"}, {"adapter": ID, "adapter_version": 1}):
            done = await client.complete(
                PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True, **pinned
            )
            assert (done.adapter_version, done.token_ids) == (1, expected["w1"])
        for bad, code in (
            ({"adapter": f"{ID}@9"}, grpc.StatusCode.NOT_FOUND),
            ({"adapter": f"{ID}@1", "adapter_version": 2}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"adapter": f"{ID}@x"}, grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(ManyloraError) as refused:
                await client.complete(PROMPT, max_new_tokens=NEW_TOKENS, **bad)
            assert refused.value.code == code, bad

        # Deleted: NOT_FOUND everywhere; re-uploaded: the new weights, as the next version.
        await stack.delete(ID)
        for worker in workers:
            await gone_within(worker, bound_s)
        await stack.upload({ID: folders["w3"]})
        for worker in workers:
            assert await served_within(worker, 3, bound_s) == expected["w3"]
        deadline = time.monotonic() + bound_s + 2  # the router's negative cache lasts 1 s
        while True:
            try:
                done = await client.complete(
                    PROMPT, adapter=ID, max_new_tokens=NEW_TOKENS, ignore_eos=True
                )
                break
            except ManyloraError as exc:
                assert exc.code == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert (done.adapter_version, done.token_ids) == (3, expected["w3"])

    for worker in workers:  # old versions have left the host cache; one copy on the GPU
        stats = await worker_stats(worker)
        assert list(stats.host_cached_adapters) == [ID]
        assert list(stats.resident_adapters) == [ID]
        assert isinstance(worker.engine, EngineLoop)  # on the CPU the engine is on a thread
        keys = worker.engine.engine.adapters.resident_keys()
        assert [k.version for k in keys] == [3], keys


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server; requested before `stack`, so it outlives the stack."""
    process = RedisProcess(tmp_path)
    process.start()
    yield process
    process.kill()


async def test_versions_reach_both_workers_through_redis_notices(
    redis: RedisProcess, stack: Stack, oracle
):
    await stack.start_store(redis_url=redis.url)
    # A TTL far beyond the bound: only the notices can make it.
    overrides = {"adapter_events_redis_url": redis.url, "adapter_version_ttl_s": 600.0}
    await check_versions(stack, oracle, NOTICE_BOUND_S, overrides)


async def test_versions_reach_both_workers_by_ttl_without_redis(stack: Stack, oracle):
    await stack.start_store()
    ttl = 0.25
    await check_versions(stack, oracle, ttl + 3.0, {"adapter_version_ttl_s": ttl})


async def test_a_worker_without_notices_keeps_its_version_until_the_ttl(stack: Stack, oracle):
    """The control for the two above: with a long TTL and no notices, v1 stays."""
    folders, expected, _ = oracle
    await stack.start_store()
    await stack.upload({ID: folders["w1"]})
    worker = await stack.start_worker(adapter_version_ttl_s=600.0)
    assert await on_worker(worker, ID) == (1, expected["w1"])
    await stack.upload({ID: folders["w2"]})
    await asyncio.sleep(0.5)
    assert await on_worker(worker, ID) == (1, expected["w1"])
    assert await on_worker(worker, ID, version=2) == (2, expected["w2"])
