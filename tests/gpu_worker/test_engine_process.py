"""The engine in its own process (`--engine-process`): what crosses the pipe arrives whole, an
engine process that dies takes only its own requests down and says so, and none outlives its
worker. (test_server.py runs the servicer's tests against both engine placements.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from manylora.v1 import common_pb2, gpu_worker_pb2, gpu_worker_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.config import ConfigError
from services.common.errors import FAILURE_SCOPE_KEY, WORKER_FAILURE
from services.common.lora_format import CanonicalAdapter
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.serving import adapter_handoff
from services.gpu_worker.serving.adapter_handoff import AdapterHandoff
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.engine_process import AdapterCopies, EngineProcess
from services.gpu_worker.serving.server import Worker, start_worker

ADAPTERS = [f"ad-{i}" for i in range(5)]


def _adapter_folders(tmp_path: Path) -> Path:
    """Five adapters: attention ones of ranks 4-16 and an all-linear one."""
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    for i, name in enumerate(ADAPTERS):
        targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
        if i == 4:
            targets += ("gate_proj", "up_proj", "down_proj")
        save_random_peft_adapter(
            tmp_path / name, shape, rank=4 * (1 + i % 4), seed=i, targets=targets, std=0.2
        )
    return tmp_path


def _config(tmp_path: Path, engine_process: str, **overrides: object) -> WorkerConfig:
    fields: dict[str, object] = {
        "port": 0,
        "device": "cpu",
        "adapters": [str(tmp_path)],
        "pool_slots": 4096,
        "engine_process": engine_process,
        **overrides,
    }
    return WorkerConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def process_worker(tmp_path: Path) -> AsyncIterator[Worker]:
    worker = await start_worker(_config(_adapter_folders(tmp_path), "on"))
    yield worker
    await worker.stop()


def _requests() -> list[common_pb2.GenerateRequest]:
    """Every adapter and the base model, greedy and seeded-sampled, with logprobs and a stop
    string: what each output carries must cross the pipe."""
    out = []
    for i, adapter in enumerate(["", *ADAPTERS] * 2):
        params = common_pb2.SamplingParams(
            max_new_tokens=14, ignore_eos=True, logprobs=True, stop=["\ufffd"] if i % 3 == 0 else []
        )
        if i % 2:
            params.temperature, params.top_p, params.top_k, params.seed = 0.9, 0.9, 20, 100 + i
        out.append(
            common_pb2.GenerateRequest(
                request_id=f"same-id-{i % 2}",  # ids that collide: outputs go by the engine's
                adapter_id=adapter,
                prompt=f"prompt number {i}",
                params=params,
            )
        )
    return out


async def _run_all(port: int) -> list[tuple[list[int], str, list[float], int]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)

        async def one(
            request: common_pb2.GenerateRequest,
        ) -> tuple[list[int], str, list[float], int]:
            responses = [r async for r in stub.Generate(request)]
            tokens = [t for r in responses for t in r.token_ids]
            logprobs = [p for r in responses for p in r.logprobs]
            text = "".join(r.text for r in responses)
            return tokens, text, logprobs, responses[-1].finish_reason

        return list(await asyncio.gather(*(one(r) for r in _requests())))


async def test_streams_match_the_engine_on_a_thread_with_adapters_cycled_through_the_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The oracle is the same engine on a thread of the server's process (its outputs are
    checked against HF+PEFT elsewhere). The engine process's adapter copies are bounded to
    300 KB, about two of these five adapters (57-229 KB each), so the second round of
    requests sends most of them again after a forget. Adapters cross as files in a
    shared-memory folder, each gone once the engine process has read it, and, where no file
    can be written, through the pipe itself."""
    folders = _adapter_folders(tmp_path / "adapters")
    shm = tmp_path / "shm"
    shm.mkdir()
    written: list[str | None] = []
    write = AdapterHandoff.write

    def counted_write(self: AdapterHandoff, adapter: CanonicalAdapter) -> str | None:
        written.append(path := write(self, adapter))
        return path

    monkeypatch.setattr(AdapterHandoff, "write", counted_write)
    results = {}
    for mode, handoff in (("off", shm), ("on", shm), ("on", tmp_path / "missing")):
        monkeypatch.setattr(adapter_handoff, "SHM_DIR", handoff)
        worker = await start_worker(_config(folders, mode, host_cache_bytes=300_000))
        try:
            results[mode, handoff] = await _run_all(worker.port)
        finally:
            await worker.stop()
        if handoff == shm and mode == "on":
            files = [p for p in written if p is not None]
            assert len(files) > len(ADAPTERS) and len(files) == len(written)
            written.clear()
    assert written and all(p is None for p in written)  # the missing folder: the pipe
    assert not list(shm.iterdir())
    thread = results["off", shm]
    for process in (results["on", shm], results["on", tmp_path / "missing"]):
        _assert_same_streams(thread, process)


def _assert_same_streams(
    thread: list[tuple[list[int], str, list[float], int]],
    process: list[tuple[list[int], str, list[float], int]],
) -> None:
    for t, p in zip(thread, process, strict=True):
        assert p[0] == t[0]
        assert p[1] == t[1]
        assert p[2] == pytest.approx(t[2], abs=1e-4)
        assert p[3] == t[3]
    assert any(r[3] == common_pb2.STOP for r in process)  # the stop string did its part


async def test_careless_clients_leave_other_streams_through_the_pipe_untouched(tmp_path: Path):
    """While three streams run, other clients send what the engine process must refuse (a
    request its pool can never hold, refused on its side of the pipe; token ids outside the
    vocabulary; an unknown adapter) and cancel streams mid-way, reusing the three's request
    ids. The three get exactly the tokens they get alone."""
    worker = await start_worker(_config(_adapter_folders(tmp_path), "on", pool_slots=1024))
    params = common_pb2.SamplingParams(max_new_tokens=30, ignore_eos=True)
    good = [
        common_pb2.GenerateRequest(
            request_id=f"id-{i}", adapter_id=a, prompt=f"p{i}", params=params
        )
        for i, a in enumerate(["", "ad-0", "ad-1"])
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)

            async def tokens(request: common_pb2.GenerateRequest) -> list[int]:
                return [t for r in [r async for r in stub.Generate(request)] for t in r.token_ids]

            alone = [await tokens(r) for r in good]

            async def careless(i: int) -> None:
                never_fits = common_pb2.SamplingParams(max_new_tokens=600)  # 1,204 slots > 1,024
                bad = {
                    "can never fit": common_pb2.GenerateRequest(prompt="x", params=never_fits),
                    "outside vocab": common_pb2.GenerateRequest(
                        prompt_token_ids=common_pb2.PromptTokenIds(ids=[5, 10**6]), params=params
                    ),
                    "nope": common_pb2.GenerateRequest(
                        adapter_id="nope", prompt="x", params=params
                    ),
                }
                for needle, request in bad.items():
                    request.request_id = f"id-{i % 3}"
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await tokens(request)
                    assert needle in (err.value.details() or ""), err.value.details()
                request = common_pb2.GenerateRequest(
                    request_id=f"id-{i % 3}", adapter_id="ad-0", prompt="c", params=params
                )
                call = stub.Generate(request)
                await call.read()
                call.cancel()

            async with asyncio.timeout(60):  # a refusal lost in the pipe would hang its call
                together = await asyncio.gather(
                    *(tokens(r) for r in good), *(careless(i) for i in range(6))
                )
            assert together[: len(good)] == alone
            stats = await poll_running(stub, 0)
            assert stats.kv_slots == 0  # the cancelled and refused hold nothing
    finally:
        await worker.stop()


async def poll_running(stub: gpu_worker_pb2_grpc.GpuWorkerStub, running: int) -> Any:
    """GetStats once the engine runs `running` requests (cancels take a step to land)."""
    async with asyncio.timeout(10):
        while True:
            stats = await stub.GetStats(gpu_worker_pb2.GetStatsRequest())
            if stats.running_requests == running and stats.waiting_requests == 0:
                return stats
            await asyncio.sleep(0.02)


async def test_stats_count_a_finished_stream_as_soon_as_its_client_sees_it_end(
    process_worker: Worker,
):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{process_worker.port}") as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        for adapter in ("", "ad-2", "ad-4"):
            params = common_pb2.SamplingParams(max_new_tokens=5, ignore_eos=True)
            request = common_pb2.GenerateRequest(adapter_id=adapter, prompt="abc", params=params)
            responses = [r async for r in stub.Generate(request)]
            assert responses[-1].finish_reason == common_pb2.LENGTH
            stats = await stub.GetStats(gpu_worker_pb2.GetStatsRequest())
            assert (stats.running_requests, stats.waiting_requests, stats.kv_slots) == (0, 0, 0)
        assert sorted(stats.resident_adapters) == ["ad-2", "ad-4"]


async def test_a_dead_engine_process_fails_its_streams_as_the_workers_fault(
    process_worker: Worker,
):
    """Killed mid-stream: every running stream ends with a worker-scoped error (a router
    retries it elsewhere), health turns NOT_SERVING and new requests are UNAVAILABLE, at
    once and not after a timeout."""
    engine = process_worker.engine
    assert isinstance(engine, EngineProcess) and engine.pid is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{process_worker.port}") as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        params = common_pb2.SamplingParams(max_new_tokens=900, ignore_eos=True)
        calls = [
            stub.Generate(common_pb2.GenerateRequest(adapter_id=a, prompt="x", params=params))
            for a in ("", "ad-1")
        ]
        for call in calls:
            assert len((await call.read()).token_ids) == 1
        os.kill(engine.pid, signal.SIGKILL)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with asyncio.timeout(10):
                    while await call.read() is not grpc.aio.EOF:
                        pass
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "engine process exited" in (err.value.details() or "")
            trailing = dict(err.value.trailing_metadata() or ())
            assert trailing.get(FAILURE_SCOPE_KEY) == WORKER_FAILURE
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(
                common_pb2.GenerateRequest(
                    prompt="y", params=common_pb2.SamplingParams(max_new_tokens=2)
                )
            ).read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="manylora.v1.GpuWorker")
        async with asyncio.timeout(5):
            while (
                await health.Check(request)
            ).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                await asyncio.sleep(0.02)


async def test_a_frozen_engine_process_is_killed_and_its_streams_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Stopped mid-stream (SIGSTOP: as a hung device call looks from outside), it answers
    nothing while the gRPC process still would: after --engine-stall-timeout-s the worker
    kills it, fails its streams as the worker's fault and turns NOT_SERVING. The adapter files
    written for requests it never read are removed."""
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(adapter_handoff, "SHM_DIR", shm)
    config = _config(_adapter_folders(tmp_path / "adapters"), "on", engine_stall_timeout_s=1.5)
    worker = await start_worker(config)
    engine = worker.engine
    assert isinstance(engine, EngineProcess) and engine.pid is not None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
            params = common_pb2.SamplingParams(max_new_tokens=900, ignore_eos=True)
            call = stub.Generate(common_pb2.GenerateRequest(prompt="x", params=params))
            assert len((await call.read()).token_ids) == 1
            os.kill(engine.pid, signal.SIGSTOP)
            began = time.monotonic()
            unread = [  # their adapters go to files the frozen engine never reads
                stub.Generate(common_pb2.GenerateRequest(adapter_id=a, prompt="y", params=params))
                for a in ("ad-2", "ad-3")
            ]
            async with asyncio.timeout(5):
                while len(list(shm.iterdir())) < 2:
                    await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with asyncio.timeout(15):
                    while await call.read() is not grpc.aio.EOF:
                        pass
            assert 1.0 < time.monotonic() - began < 10
            assert "killed as frozen" in (err.value.details() or "")
            for late in unread:
                with pytest.raises(grpc.aio.AioRpcError, match="killed as frozen"):
                    await late.read()
            assert not list(shm.iterdir())
            trailing = dict(err.value.trailing_metadata() or ())
            assert trailing.get(FAILURE_SCOPE_KEY) == WORKER_FAILURE
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="manylora.v1.GpuWorker")
            reply = await health.Check(request)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not _alive(engine.pid)
    finally:
        await worker.stop()


async def test_an_idle_engine_process_is_not_taken_for_frozen(tmp_path: Path):
    """Idle, it still reports twice a second: a stall bound shorter than any request's
    wait does not kill a healthy engine."""
    worker = await start_worker(
        _config(_adapter_folders(tmp_path), "on", engine_stall_timeout_s=1.5)
    )
    try:
        await asyncio.sleep(3.5)
        assert len(await _run_all(worker.port)) == 12
    finally:
        await worker.stop()


async def test_the_engine_process_leaves_ctrl_c_to_the_grpc_process(process_worker: Worker):
    """Ctrl-C in a terminal signals the whole process group: the engine process must not
    die under the gRPC process's drain. It ignores SIGINT and keeps streaming."""
    engine = process_worker.engine
    assert isinstance(engine, EngineProcess) and engine.pid is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{process_worker.port}") as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        params = common_pb2.SamplingParams(max_new_tokens=40, ignore_eos=True)
        call = stub.Generate(common_pb2.GenerateRequest(prompt="x", params=params))
        tokens = len((await call.read()).token_ids)
        os.kill(engine.pid, signal.SIGINT)
        while (reply := await call.read()) is not grpc.aio.EOF:
            tokens += len(reply.token_ids)
    assert tokens == 40
    assert _alive(engine.pid)


async def test_a_start_cancelled_while_the_engine_builds_leaves_no_engine_process(
    tmp_path: Path,
):
    """A worker told to stop while its model loads (a signal then cancels its start) must
    not leave the engine process behind."""
    assert not multiprocessing.active_children()
    starting = asyncio.create_task(start_worker(_config(tmp_path, "on")))
    await asyncio.sleep(0.3)  # the engine process is importing torch or building the model
    assert multiprocessing.active_children()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not multiprocessing.active_children()


async def test_the_engine_process_ends_with_its_worker(process_worker: Worker):
    engine = process_worker.engine
    assert isinstance(engine, EngineProcess) and engine.pid is not None
    assert _alive(engine.pid)
    await process_worker.stop()
    assert not _alive(engine.pid)


def test_the_engine_process_ends_when_the_server_process_is_killed(tmp_path: Path):
    """A worker whose gRPC process is SIGKILLed (no clean-up runs) leaves no engine process
    holding the GPU: it sees its pipe close and exits."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import asyncio, os, signal, sys\n"
        "from services.gpu_worker.serving.config import WorkerConfig\n"
        "from services.gpu_worker.serving.server import start_worker\n"
        "async def main():\n"
        "    config = WorkerConfig(port=0, device='cpu', pool_slots=1024, engine_process='on')\n"
        "    worker = await start_worker(config)\n"
        "    print(worker.engine.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_an_engine_that_cannot_be_built_ends_the_worker_with_one_line():
    """The engine process logs the traceback; the worker exits 1 with the reason on its
    last line, not a second traceback from the waiting side."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = ["--device", "cpu", "--engine-process", "on", "--port", "0"]
    args += ["--pool-slots", str(10**14)]  # the pool's memory cannot be had
    done = subprocess.run(
        [sys.executable, "-m", "services.gpu_worker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m services.gpu_worker: error: building the engine failed:")
    assert "allocate" in last


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _adapter(name: str, numel: int, version: int = 1) -> CanonicalAdapter:
    a = CanonicalAdapter(name, 4, 8.0, 2.0, "tiny", version=version, sha256=f"{name}{version}")
    a.lora_a["q_proj"] = torch.zeros(numel // 2)
    a.lora_b["q_proj"] = torch.zeros(numel // 2)
    return a


def test_adapter_copies_send_each_identity_once_and_forget_the_oldest_beyond_the_budget():
    copies = AdapterCopies(budget=3 * 400)  # three adapters of 400 bytes (100 fp32 each)
    a, b, c, d = (_adapter(n, 100) for n in "abcd")
    assert [m[0] for m in copies.messages_for(a)] == ["adapter"]
    assert copies.messages_for(a) == []  # held: nothing to send
    copies.messages_for(b)
    copies.messages_for(c)
    copies.messages_for(a)  # a is now the most recent
    assert copies.messages_for(d) == [("adapter", d), ("forget", b.key)]
    assert [m[0] for m in copies.messages_for(b)] == ["adapter", "forget"]  # b again: sent
    v2 = _adapter("a", 100, version=2)  # a new version is another identity
    assert copies.messages_for(v2)[0] == ("adapter", v2)
    big = _adapter("big", 1000)  # larger than the budget alone: still sent, others forgotten
    sent = copies.messages_for(big)
    assert sent[0] == ("adapter", big) and len(sent) == 4


def test_engine_process_takes_on_off_auto():
    with pytest.raises(ConfigError, match=r"^--engine-process \(MANYLORA_ENGINE_PROCESS\): 'yes'"):
        WorkerConfig(engine_process="yes")
    assert WorkerConfig().engine_in_process("cuda")
    assert not WorkerConfig().engine_in_process("cpu")
    assert WorkerConfig(engine_process="on").engine_in_process("cpu")
    assert not WorkerConfig(engine_process="off").engine_in_process("cuda")
