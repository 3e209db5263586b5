"""Fixtures of the hostile suites: the real stack (store, CPU workers, router on free ports)
and workers in their own processes, for faults a test cannot inflict on itself (SIGSTOP,
SIGKILL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack, stack_at
from tests.processes import ServiceProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def hostile_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """An empty Stack: each test starts the store, workers and routers it needs."""
    async for running in stack_at(tmp_path):
        yield running


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[[list[str]], ServiceProcess]]:
    """Starts CPU worker processes (the dummy tiny model) with the given extra flags; all are
    killed at the end (SIGKILL ends a stopped process too)."""
    started: list[ServiceProcess] = []

    def start(args: list[str]) -> ServiceProcess:
        flags = ["--device", "cpu", "--model", "tiny", "--log-level", "WARNING", *args]
        worker = ServiceProcess("services.gpu_worker", flags, tmp_path, one_thread=False)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
