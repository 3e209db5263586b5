"""A burst of other clients' first requests, each for an adapter the worker has never fetched,
does not stall a stream that is already running: its tokens keep coming, and they are the
tokens it gets alone. Each adapter's check (sha256 and parse, done once per download) is made
to take 0.5 s, as a large adapter's does on a busy host; the worker runs checks on threads, so
the event loop that relays the running stream stays free."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from manylora.v1 import common_pb2, router_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.adapters import store_adapter_source
from tests.e2e.stack import Stack

CHECK_S = 0.5
COLD = 8


def _request(adapter_id: str, new_tokens: int) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        adapter_id=adapter_id,
        prompt="a running stream",
        params=common_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
    )


async def _stream(
    stub: router_pb2_grpc.RouterStub,
    request: common_pb2.GenerateRequest,
    started: asyncio.Event | None = None,
):
    """(token ids, arrival time of each message, last message); `started` set at the first."""
    tokens: list[int] = []
    times: list[float] = []
    last = None
    async for response in stub.Generate(request):
        if started is not None:
            started.set()
        times.append(time.monotonic())
        tokens.extend(response.token_ids)
        last = response
    return tokens, times, last


async def test_a_burst_of_cold_adapter_fetches_does_not_stall_a_running_stream(
    stack: Stack, tmp_path: Path, monkeypatch
):
    await stack.start_store()
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    folders = {
        f"cold-{i}": save_random_peft_adapter(tmp_path / f"cold-{i}", shape, 8, seed=i)
        for i in range(COLD)
    }
    folders["warm"] = save_random_peft_adapter(tmp_path / "warm", shape, 8, seed=100)
    await stack.upload(folders)
    await stack.start_worker()
    router = await stack.start_router()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        alone, _, _ = await _stream(stub, _request("warm", 300))  # also fetches "warm"

        checks: list[float] = []
        on_loop: list[bool] = []
        real = store_adapter_source._verified

        def slow_check(*args: Any) -> Any:
            on_loop.append(threading.current_thread() is threading.main_thread())
            checks.append(time.monotonic())
            time.sleep(CHECK_S)
            return real(*args)

        monkeypatch.setattr(store_adapter_source, "_verified", slow_check)
        started = asyncio.Event()
        running = asyncio.create_task(_stream(stub, _request("warm", 300), started))
        await started.wait()
        burst = [_stream(stub, _request(f"cold-{i}", 4)) for i in range(COLD)]
        results = await asyncio.gather(*burst)
        tokens, times, last = await running
    # The test means something only if the stream outlived at least one whole check.
    assert checks and times[-1] - checks[0] > CHECK_S, times[-1] - checks[0] if checks else None
    assert tokens == alone
    assert last is not None and last.finish_reason == common_pb2.LENGTH
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < 0.8 * CHECK_S, f"the running stream stalled {max(gaps):.2f} s"
    assert not any(on_loop), "an adapter check ran on the event loop's thread"
    for cold_tokens, _, cold_last in results:
        assert len(cold_tokens) == 4 and cold_last.finish_reason == common_pb2.LENGTH
    assert len(checks) == COLD
