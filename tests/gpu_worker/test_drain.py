"""Stopping a worker (what SIGTERM runs) drains: health goes NOT_SERVING, new streams are
refused, and the streams already running get `--drain-timeout-s` to finish before they are
cut. The engine is slowed to 20 ms a step, so a 150-token stream takes 3 s: longer than a
short drain, and than the 2 s grace gRPC servers are often stopped with."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from manylora.v1 import common_pb2, gpu_worker_pb2_grpc
from services.common.config import ConfigError, load_config
from services.gpu_worker.engine.engine_loop import EngineLoop
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.server import Worker, start_worker

STEP_S = 0.02
TOKENS = 150


async def _slow_worker(drain_timeout_s: float) -> Worker:
    config = WorkerConfig(port=0, device="cpu", pool_slots=1024, drain_timeout_s=drain_timeout_s)
    worker = await start_worker(config)
    assert isinstance(worker.engine, EngineLoop)  # on the CPU the engine is on a thread
    engine = worker.engine.engine
    step = engine.step

    def slow_step():  # runs on the engine thread
        time.sleep(STEP_S)
        return step()

    engine.step = slow_step  # type: ignore[method-assign]
    return worker


async def _stream(port: int, got: list[int]) -> grpc.StatusCode | None:
    """Stream TOKENS tokens into `got`; the status it ended with (None: it finished)."""
    request = common_pb2.GenerateRequest(
        prompt="hello", params=common_pb2.SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        try:
            async for response in stub.Generate(request):
                got.extend(response.token_ids)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return None


async def _stop_after_first_tokens(worker: Worker) -> tuple[grpc.StatusCode | None, list[int]]:
    got: list[int] = []
    stream = asyncio.create_task(_stream(worker.port, got))
    while len(got) < 3:
        await asyncio.sleep(0.01)
    await worker.stop()
    return await asyncio.wait_for(stream, 10), got


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Worker]]:
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        worker.engine.stop()


async def test_running_streams_finish_within_the_drain(cleanup: list[Worker]):
    worker = await _slow_worker(drain_timeout_s=30)
    cleanup.append(worker)
    status, got = await _stop_after_first_tokens(worker)
    assert status is None and len(got) == TOKENS  # 150 × 20 ms = 3 s, well inside 30 s


async def test_streams_longer_than_the_drain_are_cut(cleanup: list[Worker]):
    worker = await _slow_worker(drain_timeout_s=0.2)
    cleanup.append(worker)
    began = time.monotonic()
    status, got = await _stop_after_first_tokens(worker)
    assert status is not None, "the stream outlived a 0.2 s drain"
    assert len(got) < TOKENS
    assert time.monotonic() - began < 5


async def test_no_new_stream_is_taken_while_draining(cleanup: list[Worker]):
    worker = await _slow_worker(drain_timeout_s=30)
    cleanup.append(worker)
    first: list[int] = []
    running = asyncio.create_task(_stream(worker.port, first))
    while len(first) < 3:
        await asyncio.sleep(0.01)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.1)  # the server is draining now
    late: list[int] = []
    assert await _stream(worker.port, late) is not None and late == []
    await stopping
    assert await running is None and len(first) == TOKENS


def test_drain_timeout_is_a_flag_and_an_env_var_and_refuses_negatives():
    config = load_config(WorkerConfig, ["--drain-timeout-s", "7.5"], {})
    assert config.drain_timeout_s == 7.5
    from_env = load_config(WorkerConfig, [], {"MANYLORA_DRAIN_TIMEOUT_S": "3"})
    assert from_env.drain_timeout_s == 3.0
    with pytest.raises(ConfigError, match=r"drain_timeout_s|drain-timeout-s"):
        load_config(WorkerConfig, ["--drain-timeout-s", "-1"], {})
