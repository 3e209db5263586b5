"""`make run`: the whole stack on this machine, without Docker.

Starts an adapter store on disk (a temporary folder), one CPU worker with the small dummy
model that fetches adapters from the store, and a router in front; uploads a few random PEFT
adapters through the store's API; streams completions for two adapters and the base model
through the router with the Python client; then stops (or, with --serve, keeps serving).

The model has random weights, so its text is noise: what the demo shows is a request's whole
path working (client -> router -> worker -> store, and tokens streaming back).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc

from manylora.v1.adapter_store_pb2_grpc import AdapterStoreStub
from services.adapter_store.cli import describe, upload
from services.adapter_store.config import AdapterStoreConfig
from services.adapter_store.server import start_store_server
from services.client import AsyncManyloraClient
from services.client.__main__ import printable
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.config import exit_on_startup_error
from services.common.grpc_server import SERVER_OPTIONS
from services.common.logging import setup_logging
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.server import start_worker
from services.router.config import RouterConfig
from services.router.server import start_router

PROG = "python -m services.router.demo"
PROMPT = "Once upon a time, a thousand adapters"
DEMO_ADAPTERS = {"demo-rank8": 8, "demo-rank16": 16, "demo-rank32": 32}
STREAMED = ("demo-rank8", "demo-rank32", "")


def upload_demo_adapters(store_target: str, folder: Path) -> None:
    """Write random PEFT adapters and upload them as an operator would (blocking client)."""
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    with grpc.insecure_channel(store_target, options=SERVER_OPTIONS) as channel:
        stub = AdapterStoreStub(channel)
        for seed, (name, rank) in enumerate(DEMO_ADAPTERS.items()):
            path = save_random_peft_adapter(folder / name, shape, rank, seed=seed)
            print("uploaded " + describe(upload(stub, path, name)))


@contextlib.asynccontextmanager
async def running_stack(tmp: Path, router_port: int) -> AsyncIterator[str]:
    """Store, worker and router on this machine; yields the router's address."""
    store = await start_store_server(AdapterStoreConfig(port=0, data_dir=str(tmp / "store")))
    store_target = f"127.0.0.1:{store.port}"
    try:
        await asyncio.to_thread(upload_demo_adapters, store_target, tmp / "peft")
        worker = await start_worker(
            WorkerConfig(port=0, model="tiny", dummy=True, device="cpu", adapter_store=store_target)
        )
        try:
            router = await start_router(
                RouterConfig(
                    port=router_port,
                    workers=[f"127.0.0.1:{worker.port}"],
                    adapter_store=store_target,
                )
            )
            try:
                print(
                    f"store on {store_target}, worker (dummy 'tiny' model, CPU) on "
                    f"127.0.0.1:{worker.port}, router on 127.0.0.1:{router.port}"
                )
                yield f"127.0.0.1:{router.port}"
            finally:
                await router.stop()
        finally:
            await worker.stop()
    finally:
        await store.stop()


async def stream_one(client: AsyncManyloraClient, adapter: str) -> None:
    sys.stdout.write(f"\n[{adapter or 'base model'}] {PROMPT}")
    async for chunk in client.generate(
        PROMPT, adapter=adapter, max_new_tokens=48, temperature=0.8, top_p=0.95, seed=7
    ):
        sys.stdout.write(printable(chunk.text))
        sys.stdout.flush()
        if chunk.usage is not None:
            sys.stdout.write(
                f"\n  -> {chunk.usage.completion_tokens} tokens, finish {chunk.finish_reason}, "
                f"first token after {chunk.usage.time_to_first_token_ms:.1f} ms at the worker\n"
            )


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C")
    parser.add_argument("--router-port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="manylora-demo-") as tmp:
        async with running_stack(Path(tmp), args.router_port) as target:
            async with AsyncManyloraClient(target, timeout=120) as client:
                listed = [info.adapter_id for info in await client.list_adapters()]
                print(f"the router lists: {', '.join(listed)}")
                for adapter in STREAMED:
                    await stream_one(client, adapter)
            if args.serve:
                print(
                    f"\nserving; try: python -m services.client 'Hello' --adapter demo-rank16 "
                    f"--target {target}\n(Ctrl-C stops)"
                )
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt), exit_on_startup_error(PROG):
        asyncio.run(main())
