"""The worker serving over gRPC from a CUDA device in bf16: mixed adapters stream to the end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from manylora.v1 import common_pb2, gpu_worker_pb2, gpu_worker_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.engine_process import EngineProcess
from services.gpu_worker.serving.server import start_worker


@pytest.mark.gpu
@pytest.mark.parametrize("engine_process", ["auto", "off"])  # auto: its own process on CUDA
async def test_cuda_worker_streams_mixed_adapter_requests(tmp_path: Path, engine_process: str):
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    for seed, rank in enumerate((8, 16, 32, 64)):
        save_random_peft_adapter(tmp_path / f"r{rank}", shape, rank=rank, seed=seed)
    config = WorkerConfig(
        port=0,
        device="cuda",
        dtype="bfloat16",
        adapters=[str(tmp_path)],
        engine_process=engine_process,
    )
    worker = await start_worker(config)
    assert isinstance(worker.engine, EngineProcess) == (engine_process == "auto")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)

            async def run(adapter: str) -> list[int]:
                request = common_pb2.GenerateRequest(
                    adapter_id=adapter,
                    prompt="manylora on the device",
                    params=common_pb2.SamplingParams(max_new_tokens=24, ignore_eos=True),
                )
                responses = [r async for r in stub.Generate(request)]
                assert responses[-1].finish_reason == common_pb2.LENGTH
                return [t for r in responses for t in r.token_ids]

            adapters = ["", "r8", "r16", "r32", "r64"] * 4
            outputs = await asyncio.gather(*(run(a) for a in adapters))
            stats = await stub.GetStats(gpu_worker_pb2.GetStatsRequest())
    finally:
        await worker.stop()
    assert all(len(o) == 24 for o in outputs)
    # Greedy and batched: each adapter gives one answer, and the adapters differ from the base.
    by_adapter = {
        a: {tuple(o) for o, b in zip(outputs, adapters, strict=True) if b == a}
        for a in set(adapters)
    }
    assert all(len(v) == 1 for v in by_adapter.values()), by_adapter
    assert len({next(iter(v)) for v in by_adapter.values()}) == 5
    assert stats.running_requests == 0 and stats.kv_slots == 0
