"""Replay a trace against an Engine in this process, on the wall clock.

One loop does what the worker's engine thread does, minus gRPC: it adds each request once its
arrival time has come, runs `engine.step()` while there is work, and sleeps until the next
arrival when there is none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from benchmarks.serving.metrics import PoolTimeline, RequestRecord, StepLog
from benchmarks.workload import Trace, TraceRequest, prompt_tokens, warm_up_prompts
from services.common.errors import ServiceError
from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.engine import sampling_draw
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer

AdapterFor = Callable[[TraceRequest], CanonicalAdapter | None]


def _sink(
    record: RequestRecord, clock: Callable[[], float], bar: tqdm
) -> Callable[[StepOutput], None]:
    def on_output(out: StepOutput) -> None:
        now = clock()
        record.on_tokens(now, len(out.token_ids))
        if out.error is not None:
            record.error = f"{type(out.error).__name__}: {out.error}"
        elif out.finish_reason is FinishReason.ABORTED:
            record.error = "aborted"
        if out.finish_reason is not None:
            record.finish_s = now
            bar.update(1)

    return on_output


# How every request of a run samples, by name: greedy; issue #14's mix; top-p without top-k,
# as OpenAI-style clients send it (their API has no top-k). Seeded by the request's index, so
# a rerun draws the same tokens.
SAMPLINGS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "T 0.8, p 0.9, k 50": {"temperature": 0.8, "top_p": 0.9, "top_k": 50},
    "T 0.8, p 0.9": {"temperature": 0.8, "top_p": 0.9},
}


@contextlib.contextmanager
def whole_row_sort(enabled: bool) -> Iterator[None]:
    """The top-p experiment (`--whole-sort`): while on, a top-p row without top-k sorts its
    whole row at once, where the engine first looks for the nucleus among the 1,024 best
    tokens and asks the device (a read-back inside the step, which stalls overlap
    scheduling) whether it must sort the whole row. Both draw the same tokens."""
    saved = sampling_draw.NUCLEUS_WIDTH
    if enabled:
        sampling_draw.NUCLEUS_WIDTH = sys.maxsize
    try:
        yield
    finally:
        sampling_draw.NUCLEUS_WIDTH = saved


def _submit(
    engine: Engine,
    req: TraceRequest,
    prompt: list[int],
    adapter: CanonicalAdapter | None,
    sink: Callable[[StepOutput], None],
    sampling: str,
) -> None:
    """Add one request; a refusal ends it at once, as an error."""
    opts = SamplingOptions(max_new_tokens=req.output_len, ignore_eos=True)
    if SAMPLINGS[sampling]:
        opts = dataclasses.replace(opts, **SAMPLINGS[sampling], seed=req.index)
    tokenizer = ByteTokenizer(engine.model_config.vocab_size)
    try:
        engine.add(Sequence(f"r{req.index}", prompt, opts, tokenizer, sink, adapter))
    except ServiceError as exc:
        out = StepOutput(f"r{req.index}", [], "", [], FinishReason.ABORTED, error=exc)
        sink(out)


def replay(
    engine: Engine,
    trace: Trace,
    adapter_for: AdapterFor,
    timeout_s: float | None = None,
    progress: bool = True,
    steps: StepLog | None = None,
    sampling: str = "greedy",
) -> tuple[list[RequestRecord], float, PoolTimeline]:
    """Run the trace; returns the per-request records, the run's duration (start to the last
    finish, or to the timeout) and the pool occupancy after every step. `steps`, when given,
    gets every step's wall time."""
    requests = trace.requests
    prompts = prompt_tokens(trace)
    adapters = [adapter_for(r) for r in requests]  # built before the clock starts
    records = [RequestRecord(r.index, r.adapter, r.arrival_s, r.output_len) for r in requests]
    timeline = PoolTimeline()
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)
    sent = 0
    while sent < len(requests) or engine.has_work():
        now = clock()
        if timeout_s is not None and now > timeout_s:
            break
        while sent < len(requests) and requests[sent].arrival_s <= now:
            sink = _sink(records[sent], clock, bar)
            _submit(engine, requests[sent], prompts[sent], adapters[sent], sink, sampling)
            sent += 1
        if engine.has_work():
            began, waited, cpu = clock(), engine.device_wait_seconds, time.thread_time()
            ran = engine.step()
            ended = clock()
            sched = engine.scheduler
            timeline.add(ended, engine.pool.stats(), len(sched.running), len(sched.waiting))
            if steps is not None:
                cpu = time.thread_time() - cpu
                steps.add(ended - began, ran, engine.device_wait_seconds - waited, cpu)
        elif sent < len(requests):
            wake = min(requests[sent].arrival_s, timeout_s or float("inf"))
            time.sleep(max(0.0, wake - clock()))
    duration = clock()
    _cut_off(engine, records, sent)
    bar.close()
    return records, duration, timeline


def _cut_off(engine: Engine, records: list[RequestRecord], sent: int) -> None:
    """After a timeout: abort what still runs or waits, and mark what was never sent."""
    engine.flush()  # outputs of the last step (async output processing) come first
    for seq in [*engine.scheduler.running, *engine.scheduler.waiting]:
        engine.abort(seq.seq_id)
    for record in records[sent:]:
        record.error = "not sent before the run's timeout"


def warm_up(engine: Engine, adapters: list[CanonicalAdapter], prompt_lens: tuple[int, ...]) -> None:
    """Serve a few requests (each adapter given, each prompt length) before the timed run, so
    that kernel compilation and first-call costs stay out of it; then their adapters leave the
    pool (the caller subtracts their cache counts, see runs.InProcess). Two waves: the second
    arrives while the first decodes, so the warm-up runs eager mixed steps (prompts beside
    decodes) too, whose kernels prompt-only steps (CUDA graphs) never compile."""
    tokenizer = ByteTokenizer(engine.model_config.vocab_size)

    def wave(name: str, new_tokens: int) -> None:
        options = SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True)
        for k, (prompt, adapter) in enumerate(warm_up_prompts(adapters, prompt_lens)):
            engine.add(Sequence(f"{name}-{k}", prompt, options, tokenizer, _raise_errors, adapter))

    wave("warm-up-a", new_tokens=32)
    for _ in range(3):  # the first wave's prompts, then its first decodes
        engine.step()
    wave("warm-up-b", new_tokens=4)
    while engine.has_work():
        engine.step()
    engine.adapters.evict_until_free(engine.pool.num_slots)  # more than can be free: all go


def _raise_errors(out: StepOutput) -> None:
    if out.error is not None:
        raise out.error
