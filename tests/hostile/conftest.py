"""Fixtures of the hostile suites: the real stack (store, CPU workers, router on free ports)
and workers in their own processes, for faults a test cannot inflict on itself (SIGSTOP,
SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_server import free_port
from tests.e2e.stack import Stack, stack_at

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def hostile_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """An empty Stack: each test starts the store, workers and routers it needs."""
    async for running in stack_at(tmp_path):
        yield running


class WorkerProcess:
    """`python -m services.gpu_worker` in a child process (CPU, the dummy tiny model)."""

    def __init__(self, args: list[str]):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"}
        command = [sys.executable, "-m", "services.gpu_worker", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--device", "cpu", "--model", "tiny", "--log-level", "WARNING", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
        )

    async def wait_serving(self, timeout_s: float = 90.0) -> None:
        request = health_pb2.HealthCheckRequest(service="")
        async with asyncio.timeout(timeout_s):
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    assert self.process.poll() is None, "the worker process exited"
                    try:
                        reply = await stub.Check(request, timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.2)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # SIGKILL ends a stopped process too
        self.process.wait(timeout=30)


@pytest.fixture
def worker_process() -> Iterator[Callable[[list[str]], WorkerProcess]]:
    """Starts worker processes with the given extra flags; all are killed at the end."""
    started: list[WorkerProcess] = []

    def start(args: list[str]) -> WorkerProcess:
        worker = WorkerProcess(args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
