"""Real workers behind the router: a client that drops mid-stream frees the worker's memory;
a worker killed mid-run ends its streams with UNAVAILABLE and the other takes new work."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import pytest

from manylora.v1 import common_pb2, router_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.random_adapters import save_random_peft_adapter
from tests.e2e.stack import Stack, poll_stats, stop_worker, worker_stats

LONG = 900  # tokens: far more than a test waits for


def long_request(adapter: str = "", request_id: str = "") -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=request_id,
        adapter_id=adapter,
        prompt="tell me a long story",
        params=common_pb2.SamplingParams(max_new_tokens=LONG, ignore_eos=True),
    )


@pytest.fixture
async def router_stub(stack: Stack, tmp_path: Path):
    """A store with adapter `ad8`, two workers, a router, and a stub for the router."""
    await stack.start_store()
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    await stack.upload({"ad8": save_random_peft_adapter(tmp_path / "ad8", shape, 8, seed=1)})
    await stack.start_worker()
    await stack.start_worker()
    router = await stack.start_router()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        yield router_pb2_grpc.RouterStub(channel)


async def test_dropped_client_frees_the_worker_memory(stack: Stack, router_stub):
    calls = [router_stub.Generate(long_request(adapter), timeout=30) for adapter in ("", "ad8", "")]
    for call in calls:
        assert len((await call.read()).token_ids) == 1
    busy = [await worker_stats(w) for w in stack.workers]
    assert sum(s.running_requests for s in busy) == 3
    assert sum(s.kv_slots for s in busy) > 0
    for call in calls:
        call.cancel()
    for worker in stack.workers:
        stats = await poll_stats(
            worker, lambda s: s.running_requests == s.waiting_requests == s.kv_slots == 0
        )
        # Only a cached adapter may stay in the pool; every KV slot is free again.
        assert stats.free_slots + stats.adapter_slots == stats.total_slots
        if not stats.resident_adapters:
            assert stats.free_slots == stats.total_slots


async def test_worker_killed_mid_run(stack: Stack, router_stub):
    # Base-model requests go to the least loaded worker: two streams on each.
    calls = [router_stub.Generate(long_request(request_id=f"s{i}"), timeout=30) for i in range(4)]
    for call in calls:
        await call.read()
    victim, survivor = stack.workers
    assert (await worker_stats(victim)).running_requests == 2
    await stop_worker(victim)

    async def outcome(call: grpc.aio.UnaryStreamCall) -> grpc.StatusCode | str:
        # Read to the end: tokens already relayed before the crash may still be buffered, so
        # a dead worker's stream can yield a few more messages before its error arrives.
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
            return "ended"
        except grpc.aio.AioRpcError as exc:
            assert "mid-stream" in (exc.details() or "")
            return exc.code()

    async with asyncio.timeout(60):
        outcomes = await asyncio.gather(*(outcome(c) for c in calls))
    assert Counter(outcomes) == {grpc.StatusCode.UNAVAILABLE: 2, "ended": 2}
    # New work goes to the survivor and completes.
    async with asyncio.timeout(20):
        for i in range(4):
            request = long_request("ad8" if i % 2 else "", request_id=f"after{i}")
            request.params.max_new_tokens = 4
            responses = [r async for r in router_stub.Generate(request, timeout=15)]
            assert responses[-1].finish_reason == common_pb2.LENGTH
    await poll_stats(survivor, lambda s: s.running_requests == 0)
