"""`--profile-to PREFIX`: when the worker stops, PREFIX.engine.txt and PREFIX.loop.txt hold
sampled profiles, each of its own thread only (the engine's loop; the asyncio event loop),
with the folded stacks beside them, and profiling changes no output."""

from __future__ import annotations

from pathlib import Path

import pytest

from manylora.v1 import common_pb2, gpu_worker_pb2_grpc
from tests.adapter_store.helpers import aio_channel
from tests.e2e.stack import Stack


def folded_functions(path: Path) -> tuple[int, set[str]]:
    """The samples of a folded-stacks file and every file:function in its stacks."""
    samples, names = 0, set()
    for line in path.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        samples += int(count)
        names.update(stack.split(";"))
    return samples, names


@pytest.mark.parametrize("engine_process", ["off", "on"])  # on: its profile is written there
async def test_each_thread_profile_holds_its_own_threads_stacks(
    stack: Stack, tmp_path: Path, engine_process: str
):
    await stack.start_store()
    prefix = tmp_path / "profiles" / "w"
    plain = await stack.start_worker()
    profiled = await stack.start_worker(profile_to=str(prefix), engine_process=engine_process)
    params = common_pb2.SamplingParams(max_new_tokens=6, ignore_eos=True)
    request = common_pb2.GenerateRequest(prompt="hello", params=params)
    tokens = []
    for worker in (plain, profiled):
        async with aio_channel(worker.port) as channel:
            stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
            replies = [r async for r in stub.Generate(request, timeout=30)]
        tokens.append([t for r in replies for t in r.token_ids])
    assert tokens[0] == tokens[1] and len(tokens[0]) == 6
    assert not prefix.parent.exists()  # written when the worker stops, not before

    await profiled.stop()
    stack.workers.remove(profiled)
    engine_samples, engine = folded_functions(Path(f"{prefix}.engine.txt.folded"))
    loop_samples, loop = folded_functions(Path(f"{prefix}.loop.txt.folded"))
    assert engine_samples > 0 and loop_samples > 0
    assert "engine_loop.py:_serve" in engine and "engine_loop.py:_serve" not in loop
    assert "base_events.py:run_forever" in loop and "base_events.py:run_forever" not in engine
    engine_report = Path(f"{prefix}.engine.txt").read_text()
    assert f"{engine_samples} samples" in engine_report
    assert "engine_loop.py:_serve" in engine_report
    # Which line of a function the samples fell on (a C call shows as the line calling it):
    # the busiest line names a function of the report, with its line number.
    line_table = engine_report.split("line (on top of the stack)\n")[1]
    count, _, where = line_table.split()[:3]
    function, line = where.rsplit(":", 1)
    assert line.isdigit() and 0 < int(count) <= engine_samples
    assert function in engine_report.split("line (on top of the stack)")[0]
