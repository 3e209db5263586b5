"""`--profile-to PREFIX`: when the worker stops, the engine thread's and the event loop's
cProfile statistics are in PREFIX.engine.prof and PREFIX.loop.prof, each holding its own
thread's work (the engine's steps; the Generate handler), and profiling changes no output."""

from __future__ import annotations

import pstats
from pathlib import Path

from manylora.v1 import common_pb2, gpu_worker_pb2_grpc
from tests.adapter_store.helpers import aio_channel
from tests.e2e.stack import Stack


def functions(path: Path) -> set[tuple[str, str]]:
    """(file name, function name) of every function the profile saw."""
    stats = pstats.Stats(str(path))
    return {(Path(file).name, name) for file, _, name in stats.stats}  # type: ignore[attr-defined]


async def test_each_thread_profile_holds_its_own_threads_work(stack: Stack, tmp_path: Path):
    await stack.start_store()
    prefix = tmp_path / "profiles" / "w"
    plain = await stack.start_worker()
    profiled = await stack.start_worker(profile_to=str(prefix))
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
    engine = functions(Path(f"{prefix}.engine.prof"))
    loop = functions(Path(f"{prefix}.loop.prof"))
    assert ("engine.py", "step") in engine and ("engine.py", "step") not in loop
    assert ("servicer.py", "Generate") in loop and ("servicer.py", "Generate") not in engine
