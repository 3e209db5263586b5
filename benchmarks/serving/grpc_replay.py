"""Replay a trace through a router: one streaming call per request, started at its arrival."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from tqdm import tqdm

from benchmarks.serving.metrics import RequestRecord
from benchmarks.workload import Trace, TraceRequest, adapter_id, prompt_tokens, warm_up_prompts
from services.client import AsyncManyloraClient
from services.client.messages import ManyloraError

# Channel options of a client that opens hundreds of concurrent streams.
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


async def _one(
    client: AsyncManyloraClient,
    request: TraceRequest,
    prompt: list[int],
    record: RequestRecord,
    clock: Callable[[], float],
) -> None:
    try:
        async for chunk in client.generate(
            prompt,
            adapter=adapter_id(request.adapter),
            max_new_tokens=request.output_len,
            ignore_eos=True,
        ):
            record.on_tokens(clock(), len(chunk.token_ids))
            if chunk.finish_reason is not None:
                record.finish_s = clock()
                if chunk.usage is not None:
                    record.engine_ttft_s = chunk.usage.time_to_first_token_ms / 1000
                    record.engine_queue_s = chunk.usage.queue_time_ms / 1000
                if chunk.finish_reason != "length":
                    record.error = f"finished by {chunk.finish_reason}"
    except ManyloraError as exc:
        record.error, record.finish_s = str(exc), clock()
    if record.finish_s is None:
        record.error, record.finish_s = "the stream ended without a last chunk", clock()


async def replay(
    target: str,
    trace: Trace,
    timeout_s: float | None = None,
    progress: bool = True,
    probe: Callable[[float], None] | None = None,
    probe_interval_s: float = 0.05,
) -> tuple[list[RequestRecord], float]:
    """Run the trace against the router at `target`; returns the records and the duration
    (start to the last finish, or to the timeout). `probe(now)` is called every
    `probe_interval_s` while the run lasts (to sample the worker's pool)."""
    requests, prompts = trace.requests, prompt_tokens(trace)
    records = [RequestRecord(r.index, r.adapter, r.arrival_s, r.output_len) for r in requests]
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    async def sample() -> None:
        while probe is not None:
            probe(clock())
            await asyncio.sleep(probe_interval_s)

    async def launch(client: AsyncManyloraClient, bar: tqdm) -> None:
        tasks = []
        for req in requests:
            await asyncio.sleep(max(0.0, req.arrival_s - clock()))
            task = asyncio.create_task(
                _one(client, req, prompts[req.index], records[req.index], clock)
            )
            task.add_done_callback(lambda _: bar.update(1))
            tasks.append(task)
        await asyncio.gather(*tasks)

    sampler = asyncio.create_task(sample())
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)
    async with AsyncManyloraClient(target, options=CLIENT_OPTIONS) as client:
        # At the timeout wait_for cancels the calls still going; their records say so.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(launch(client, bar), timeout_s)
        duration = clock()
    bar.close()
    sampler.cancel()
    for record in records:
        if record.finish_s is None:
            record.error = record.error or "not finished before the run's timeout"
    return records, duration


async def warm_up(target: str, adapters: list[str], prompt_lens: tuple[int, ...]) -> None:
    """A few requests (each adapter, each prompt length) through the router before the timed
    run, so that kernel compilation and first-call costs stay out of it. Two waves: the
    second is sent once the first streams, so the worker runs eager mixed steps (prompts
    beside decodes) too, whose kernels prompt-only steps (CUDA graphs) never compile."""
    prompts = warm_up_prompts(adapters, prompt_lens)
    async with AsyncManyloraClient(target, options=CLIENT_OPTIONS) as client:
        streaming = [asyncio.Event() for _ in prompts]

        async def first(prompt: list[int], adapter: str, started: asyncio.Event) -> None:
            chunks = client.generate(prompt, adapter=adapter, max_new_tokens=32, ignore_eos=True)
            try:
                async for _ in chunks:
                    started.set()
            finally:  # a failed call raises from gather below rather than hang the wait
                started.set()

        waves = [
            asyncio.create_task(first(p, a, e))
            for (p, a), e in zip(prompts, streaming, strict=True)
        ]
        await asyncio.gather(*(e.wait() for e in streaming))
        second = (
            client.complete(p, adapter=a, max_new_tokens=4, ignore_eos=True) for p, a in prompts
        )
        await asyncio.gather(*waves, *second)


async def fetch_adapters(target: str, trace: Trace, concurrency: int = 8) -> None:
    """One untimed request of one token on each adapter the trace uses, `concurrency` at a
    time: the worker then holds them in host memory (a cold worker downloads each from the
    store on its first request, on the same event loop that streams tokens)."""
    names = sorted({adapter_id(r.adapter) for r in trace.requests})
    gate = asyncio.Semaphore(concurrency)
    async with AsyncManyloraClient(target, options=CLIENT_OPTIONS) as client:

        async def fetch(name: str) -> None:
            async with gate:
                await client.complete([3, 4, 5], adapter=name, max_new_tokens=1, ignore_eos=True)

        await asyncio.gather(*(fetch(name) for name in names))
