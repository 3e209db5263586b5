"""`make run`: start a worker with a small dummy model and two demo adapters on this machine,
stream one completion per adapter (and one from the base model) to the terminal, and stop.

The model has random weights, so the text is noise: what it shows is the path a request takes
(gRPC stream, continuous batching, per-request LoRA) working end to end.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import grpc

from manylora.v1 import common_pb2, gpu_worker_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.logging import setup_logging
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.config import WorkerConfig
from services.gpu_worker.server import start_worker

PROMPT = "Once upon a time, a thousand adapters"
DEMO_ADAPTERS = {"demo-rank8": 8, "demo-rank16": 16}


async def stream_one(stub: gpu_worker_pb2_grpc.GpuWorkerStub, adapter_id: str) -> None:
    request = common_pb2.GenerateRequest(
        adapter_id=adapter_id,
        prompt=PROMPT,
        params=common_pb2.SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=7),
    )
    sys.stdout.write(f"\n[{adapter_id or 'base model'}] {PROMPT}")
    async for response in stub.Generate(request):
        # Random weights emit arbitrary bytes: keep control characters off the terminal.
        sys.stdout.write("".join(c if c.isprintable() else "·" for c in response.text))
        sys.stdout.flush()
        if response.finish_reason:
            usage = response.usage
            reason = common_pb2.FinishReason.Name(response.finish_reason)
            sys.stdout.write(
                f"\n  -> {usage.completion_tokens} tokens, finish {reason}, "
                f"first token after {usage.time_to_first_token_ms:.1f} ms\n"
            )


async def main() -> None:
    setup_logging("WARNING")
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    with tempfile.TemporaryDirectory(prefix="manylora-demo-") as tmp:
        for seed, (name, rank) in enumerate(DEMO_ADAPTERS.items()):
            save_random_peft_adapter(Path(tmp) / name, shape, rank, seed=seed)
        config = WorkerConfig(port=0, model="tiny", dummy=True, device="cpu", adapters=[tmp])
        worker = await start_worker(config)
        print(f"worker serving the dummy 'tiny' model on 127.0.0.1:{worker.port}")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
                stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
                for adapter_id in ("", *DEMO_ADAPTERS):
                    await stream_one(stub, adapter_id)
        finally:
            await worker.stop()


if __name__ == "__main__":
    asyncio.run(main())
