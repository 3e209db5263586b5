"""Stats are a snapshot the engine thread publishes: GetStats, the heartbeat and the metrics
(all `GpuWorkerServicer.stats`) never read the scheduler, the pool or the adapter manager,
which the engine thread changes meanwhile."""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from kernels.compile_watch import Compiles, CompileWatch
from services.common.peft_adapter import load_peft_folder
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.adapters.adapter_source import LocalFolderAdapterSource
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.engine_loop import EngineLoop
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.serving.servicer import GpuWorkerServicer
from tests.oracle import TINY_MHA, build_pair

REQUESTS, NEW_TOKENS = 6, 120


class EngineThreadOnly:
    """Stands in for one of the engine's live objects: any read off the engine thread fails."""

    def __init__(self, target: Any):
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str) -> Any:
        thread = threading.current_thread().name
        if thread != "engine":
            raise AssertionError(f"{name} read on thread {thread!r}, off the engine thread")
        return getattr(object.__getattribute__(self, "_target"), name)


@pytest.fixture
def running(tmp_path):
    model = build_pair(TINY_MHA)[0]
    shape = model.config.shape
    adapters = [
        load_peft_folder(save_random_peft_adapter(tmp_path / f"a{i}", shape, 8, seed=i), shape, 64)
        for i in range(2)
    ]
    loop = EngineLoop(Engine(model, EngineConfig(pool_slots=4096, max_num_seqs=4)))
    loop.start()
    servicer = GpuWorkerServicer(
        loop, ByteTokenizer(), LocalFolderAdapterSource({}, shape, 64), "tiny"
    )
    yield loop, servicer, adapters
    loop.stop()


def test_stats_never_touch_the_engine_while_it_runs(running):
    loop, servicer, adapters = running
    finished = threading.Event()
    done: list[StepOutput] = []

    def sink(out: StepOutput) -> None:
        assert out.error is None, out.error
        if out.finish_reason is not None:
            done.append(out)
            if len(done) == REQUESTS:
                finished.set()

    options = SamplingOptions(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for i in range(REQUESTS):
        prompt = list(range(3, 13 + i))
        loop.submit(Sequence(f"r{i}", prompt, options, ByteTokenizer(), sink, adapters[i % 2]))
    engine = loop.engine
    # From here on, only the engine thread may read these (submit's check has been done).
    for name in ("scheduler", "pool", "adapters"):
        setattr(engine, name, EngineThreadOnly(getattr(engine, name)))
    seen_running = 0
    while not finished.is_set():
        stats = servicer.stats()
        total = stats.free_slots + stats.kv_slots + stats.adapter_slots
        assert total == stats.total_slots == 4096  # one moment's numbers, never a torn read
        assert stats.running_requests + stats.waiting_requests <= REQUESTS
        seen_running = max(seen_running, stats.running_requests)
        time.sleep(0.001)
    assert seen_running > 0, "the engine finished before stats were read while it ran"
    deadline = time.monotonic() + 5
    while servicer.stats().kv_slots and time.monotonic() < deadline:
        time.sleep(0.01)  # the snapshot after the last step
    stats = servicer.stats()
    assert (stats.running_requests, stats.waiting_requests, stats.kv_slots) == (0, 0, 0)
    assert list(stats.resident_adapters) == ["a0", "a1"]
    assert stats.adapter_cache_misses == 2 and stats.adapter_cache_hits == REQUESTS - 2


@pytest.mark.parametrize("overlap", [True, False])
def test_stats_count_the_steps_the_engine_ran_and_their_time(overlap):
    """Two requests of 10 tokens admitted together: one step runs both prompts (and draws
    each one's first token), then 9 decode-only steps; with overlap scheduling too, since a
    request whose token in flight is its last is not launched again."""
    model = build_pair(TINY_MHA)[0]
    config = EngineConfig(pool_slots=4096, max_num_seqs=4, overlap_schedule=overlap)
    loop = EngineLoop(Engine(model, config))
    ended = threading.Semaphore(0)

    def sink(out: StepOutput) -> None:
        if out.finish_reason is not None:
            ended.release()

    options = SamplingOptions(max_new_tokens=10, ignore_eos=True)
    for i in range(2):  # queued before the thread starts: both join the first step
        loop.submit(Sequence(f"r{i}", list(range(3, 8 + i)), options, ByteTokenizer(), sink))
    loop.start()
    try:
        assert ended.acquire(timeout=30) and ended.acquire(timeout=30)
        deadline = time.monotonic() + 5
        while loop.stats.steps.decode_steps < 9 and time.monotonic() < deadline:
            time.sleep(0.01)  # the snapshot after the last step
        stats = loop.stats.steps
    finally:
        loop.stop()
    assert (stats.prompt_steps, stats.decode_steps) == (1, 9)
    assert stats.prompt_step_seconds > 0 and stats.decode_step_seconds > 0
    # Prompts of 5 and 6 tokens; then each decode step runs both requests' tokens.
    assert (stats.prompt_step_tokens, stats.decode_step_tokens) == (11, 18)
    # A call waits for its step's tokens, or with overlap for the step before it's: the
    # prompt step, first, then waits for none. Waiting is part of a call, never all of it.
    if overlap:
        assert stats.prompt_step_wait_seconds == 0
    else:
        assert 0 < stats.prompt_step_wait_seconds < stats.prompt_step_seconds
    assert 0 < stats.decode_step_wait_seconds < stats.decode_step_seconds
    # The engine thread's CPU time: some of every kind of step, never more than the step.
    assert 0 < stats.decode_step_cpu_seconds <= stats.decode_step_seconds + 1e-3
    assert 0 < stats.prompt_step_cpu_seconds <= stats.prompt_step_seconds + 1e-3


def compile_as_triton_does(seconds: float) -> None:
    """Calls the compile hooks installed in Triton the way its JIT calls them around a
    compilation (triton.runtime.jit.JITFunction._call_hook's keyword arguments)."""
    from triton import knobs

    hook_args = {"key": KEY, "fn": FN, "compile": {}, "is_manual_warmup": False}
    assert knobs.runtime.jit_cache_hook(**hook_args, repr="k", already_compiled=False) is False
    time.sleep(seconds)
    knobs.runtime.jit_post_compile_hook(**hook_args, repr="k", already_compiled=False)


# A compilation's description as Triton hands it to the hooks: the function, and the cache
# key's (type, specialization) per argument.
FN = SimpleNamespace(name="_k", jit_function=SimpleNamespace(arg_names=["x_ptr", "n", "m", "B"]))
KEY = "[('*bf16', 'D'), ('i32', ''), ('i32', None), ('constexpr', 16)]{'num_warps': 4}"


def test_a_compilation_is_logged_with_its_specialization(caplog):
    with caplog.at_level(logging.INFO, logger="kernels.compile_watch"):
        compile_as_triton_does(0.0)
    assert "compiled kernel _k(x_ptr=*bf16:D, n=i32, m=i32, B=constexpr:16) in " in caplog.text


def test_kernels_compiled_inside_steps_are_counted_with_their_time(monkeypatch):
    """A compilation inside a step stalls its batch: GetStats counts those, and not one made
    outside a step (at start-up)."""
    model = build_pair(TINY_MHA)[0]
    engine = Engine(model, EngineConfig(pool_slots=4096, max_num_seqs=4))
    loop = EngineLoop(engine)
    compile_as_triton_does(0.0)  # before any step: not counted
    step = engine.step
    compiling = iter([0.05, 0.0, 0.05])  # the first three steps compile

    def compiling_step() -> Any:
        seconds = next(compiling, None)
        if seconds is not None:
            compile_as_triton_does(seconds)
        return step()

    monkeypatch.setattr(engine, "step", compiling_step)
    ended = threading.Event()

    def sink(out: StepOutput) -> None:
        if out.finish_reason is not None:
            ended.set()

    options = SamplingOptions(max_new_tokens=6, ignore_eos=True)
    loop.submit(Sequence("r", [3, 4, 5], options, ByteTokenizer(), sink))
    loop.start()
    try:
        assert ended.wait(timeout=30)
        deadline = time.monotonic() + 5
        while loop.stats.steps.decode_steps < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = loop.stats.steps
    finally:
        loop.stop()
    assert stats.kernel_compiles == 3
    assert 0.1 <= stats.kernel_compile_seconds < 1.0


def test_without_triton_the_watch_counts_nothing_and_does_not_fail(
    monkeypatch: pytest.MonkeyPatch,
):
    """torch's CPU build brings no Triton (the CPU container): the worker must still start."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    watch = CompileWatch()
    watch.install()
    assert watch.total == Compiles()
