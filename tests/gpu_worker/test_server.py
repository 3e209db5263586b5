"""The GpuWorker over a real gRPC channel on a free port: streaming, errors, cancel, stats."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from manylora.v1 import common_pb2, gpu_worker_pb2, gpu_worker_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.server import Worker, start_worker


# Every test runs with the engine on a thread of the server's process and in its own
# process (`--engine-process`, the default on a GPU): the servicer must not tell them apart.
@pytest.fixture(params=["off", "on"], ids=["engine-thread", "engine-process"])
async def worker(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Worker]:
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    save_random_peft_adapter(tmp_path / "ad-a", shape, rank=8, seed=1)
    save_random_peft_adapter(tmp_path / "ad-b", shape, rank=16, seed=2)
    config = WorkerConfig(
        port=0,
        device="cpu",
        adapters=[str(tmp_path)],
        pool_slots=1024,
        engine_process=request.param,
    )
    running = await start_worker(config)
    yield running
    await running.stop()


@pytest.fixture
async def stub(worker: Worker) -> AsyncIterator[gpu_worker_pb2_grpc.GpuWorkerStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        yield gpu_worker_pb2_grpc.GpuWorkerStub(channel)


@pytest.fixture
async def thread_stub() -> AsyncIterator[gpu_worker_pb2_grpc.GpuWorkerStub]:
    """A worker with its engine on a thread, for what never reaches the engine."""
    running = await start_worker(WorkerConfig(port=0, device="cpu", pool_slots=1024))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield gpu_worker_pb2_grpc.GpuWorkerStub(channel)
    await running.stop()


def _request(adapter: str = "", **params: object) -> common_pb2.GenerateRequest:
    params.setdefault("max_new_tokens", 12)
    return common_pb2.GenerateRequest(
        adapter_id=adapter,
        prompt="hello",
        params=common_pb2.SamplingParams(**params),  # type: ignore[arg-type]
    )


async def _collect(stub: gpu_worker_pb2_grpc.GpuWorkerStub, request: common_pb2.GenerateRequest):
    return [r async for r in stub.Generate(request)]


async def test_generate_streams_tokens_and_finishes_with_usage(stub):
    responses = await _collect(stub, _request("ad-a", ignore_eos=True))
    # One message per decode step, fewer when the stream fell behind the engine and the
    # worker merged what it owed (services/gpu_worker/serving/output_relay.py).
    assert 1 <= len(responses) <= 12
    assert all(r.request_id == responses[0].request_id != "" for r in responses)
    assert sum(len(r.token_ids) for r in responses) == 12
    last = responses[-1]
    assert last.finish_reason == common_pb2.LENGTH
    assert last.usage.prompt_tokens == len("hello") + 1  # bytes + <s>
    assert last.usage.completion_tokens == 12
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


async def test_concurrent_streams_for_different_adapters_all_finish(stub):
    requests = [_request(a, ignore_eos=True, max_new_tokens=8) for a in ("", "ad-a", "ad-b") * 3]
    results = await asyncio.gather(*(_collect(stub, r) for r in requests))
    for responses in results:
        assert sum(len(r.token_ids) for r in responses) == 8
    # Same adapter, same prompt, greedy: the same tokens whoever shared the batch.
    tokens = [[t for r in res for t in r.token_ids] for res in results]
    assert tokens[1] == tokens[4] == tokens[7]
    assert tokens[0] != tokens[1]


# Refused by the servicer before any engine sees them: the same with an engine process.
@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (_request(max_new_tokens=0), "max_new_tokens"),
        (_request(temperature=-1.0), "temperature"),
        (_request(top_p=1.5), "top_p"),
        (_request(stop_token_ids=[10**6]), "stop_token_ids"),
        (
            common_pb2.GenerateRequest(params=common_pb2.SamplingParams(max_new_tokens=1)),
            "prompt, prompt_token_ids or chat is required",
        ),
    ],
)
async def test_bad_params_are_invalid_argument(thread_stub, request_, needle):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(thread_stub, request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")


# Refused by the engine's limits (engine/request_limits.py) and its pool's size, which an
# engine process checks on its side of the pipe.
@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (
            common_pb2.GenerateRequest(
                prompt_token_ids=common_pb2.PromptTokenIds(ids=[1, 99999]),
                params=common_pb2.SamplingParams(max_new_tokens=1),
            ),
            "outside vocab",
        ),
        (
            common_pb2.GenerateRequest(
                prompt_token_ids=common_pb2.PromptTokenIds(ids=[]),
                params=common_pb2.SamplingParams(max_new_tokens=1),
            ),
            "prompt is empty",
        ),
        (_request(max_new_tokens=600), "can never fit"),
    ],
)
async def test_requests_the_engine_can_never_run_are_invalid_argument(stub, request_, needle):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stub, request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")


async def test_unknown_adapter_is_not_found(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stub, _request("no-such-adapter"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancelled_stream_frees_its_memory(stub, worker: Worker):
    call = stub.Generate(_request("ad-a", ignore_eos=True, max_new_tokens=400))
    first = await call.read()
    assert len(first.token_ids) == 1
    call.cancel()
    stats = None
    for _ in range(100):
        stats = await stub.GetStats(gpu_worker_pb2.GetStatsRequest())
        if stats.running_requests == 0 and stats.kv_slots == 0:
            break
        await asyncio.sleep(0.02)
    assert stats is not None and stats.running_requests == 0
    assert stats.kv_slots == 0
    # The adapter stays cached in the pool, unreferenced and evictable; nothing else is held.
    assert stats.free_slots + stats.adapter_slots == stats.total_slots == 1024
    assert stats.resident_adapters == ["ad-a"]


@pytest.mark.parametrize("engine_process", ["off", "on"])
async def test_full_waiting_queue_is_resource_exhausted(tmp_path: Path, engine_process: str):
    config = WorkerConfig(
        port=0,
        device="cpu",
        pool_slots=128,
        max_waiting=2,
        max_num_seqs=1,
        engine_process=engine_process,
    )
    running = await start_worker(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
            calls = [stub.Generate(_request(ignore_eos=True, max_new_tokens=40)) for _ in range(8)]
            codes = []
            for call in calls:
                try:
                    async for _ in call:
                        pass
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
            # Once they are done the queue is empty again: what was counted as waiting,
            # refused ones included, has been let go (one at a time, never refused).
            for _ in range(6):
                await _collect(stub, _request(ignore_eos=True, max_new_tokens=2))
            too_long = _request(max_new_tokens=200)  # refused by the pool, not by the bound
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _collect(stub, too_long)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await _collect(stub, _request(ignore_eos=True, max_new_tokens=2))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        await running.stop()


async def test_stats_and_health(stub, worker: Worker):
    stats = await stub.GetStats(gpu_worker_pb2.GetStatsRequest())
    assert stats.model == "tiny"
    assert sorted(stats.host_cached_adapters) == ["ad-a", "ad-b"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="manylora.v1.GpuWorker"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_stream_interval_sends_fewer_messages_of_the_same_tokens(stub):
    # The oracle: the same greedy request on a worker that sends every step's token at once.
    request = _request(ignore_eos=True, max_new_tokens=13)
    expected = [t for r in await _collect(stub, request) for t in r.token_ids]
    config = WorkerConfig(port=0, device="cpu", pool_slots=1024, stream_interval=4)
    running = await start_worker(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            responses = await _collect(gpu_worker_pb2_grpc.GpuWorkerStub(channel), request)
    finally:
        await running.stop()
    assert [t for r in responses for t in r.token_ids] == expected
    # The first token alone, then every 4 (the handler may merge further if it lags).
    assert 2 <= len(responses) <= 4
    assert responses[-1].finish_reason == common_pb2.LENGTH
    assert responses[-1].usage.completion_tokens == 13


@pytest.mark.parametrize("taken", ["port", "metrics_port"])
async def test_a_start_up_failure_stops_the_engine_thread_and_the_profiles(
    tmp_path: Path, taken: str
):
    """A taken port fails start-up, before or after the gRPC server started; nothing the
    start had begun keeps running (the engine thread, the profiles' sampler threads) and the
    profiles are written."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        prefix = tmp_path / "profile"
        fields: dict[str, Any] = {"port": 0, taken: port}
        config = WorkerConfig(device="cpu", profile_to=str(prefix), **fields)
        with pytest.raises(Exception):  # noqa: B017 (grpc's and aiohttp's own errors)
            await start_worker(config)
    ours = {"engine", "thread-profile"}  # (gRPC's poller thread lives with the process)
    deadline = asyncio.get_running_loop().time() + 10
    while any(t.name in ours for t in threading.enumerate()):
        assert asyncio.get_running_loop().time() < deadline, threading.enumerate()
        await asyncio.sleep(0.05)
    assert Path(f"{prefix}.engine.txt").exists() and Path(f"{prefix}.loop.txt").exists()
