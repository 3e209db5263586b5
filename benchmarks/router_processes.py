"""Processes of the router benchmarks: fake workers (benchmarks/fake_worker.py) and real
routers (`python -m services.router`), each on free ports, waited for until healthy and
stopped (SIGTERM, then SIGKILL) when the context ends.

A router can run from another checkout (`tree`: e.g. `git worktree add /tmp/base main`), so
that a benchmark compares two versions of the router in front of the same workers, in
alternating rounds (a noisy machine moves both alike).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.stack_processes import stop_processes, wait_healthy
from services.common.grpc_server import free_port

REPO = Path(__file__).resolve().parents[1]
BIG = str(1 << 20)  # queue bounds that refuse nothing: the benchmark measures, not sheds


@dataclass
class Router:
    name: str  # "this tree" or the other tree's path
    address: str
    pid: int


def _env(tree: Path) -> dict[str, str]:
    """The tree's code first; then this process's path (optional packages installed aside)."""
    paths = [str(tree), str(tree / "protos"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


@contextlib.contextmanager
def running_fakes(
    count: int, tokens_per_message: int = 1, interval_ms: float = 0.0, step_ms: float = 0.0
) -> Iterator[tuple[list[str], int]]:
    """`count` fake workers served by one process: (their addresses, its pid)."""
    ports = [free_port() for _ in range(count)]
    args = [a for p in ports for a in ("--port", str(p))]
    command = [
        sys.executable,
        "-m",
        "benchmarks.fake_worker",
        *args,
        "--tokens-per-message",
        str(tokens_per_message),
        "--interval-ms",
        str(interval_ms),
        "--step-ms",
        str(step_ms),
    ]
    process = subprocess.Popen(command, cwd=REPO, env=_env(REPO))
    try:
        addresses = [f"127.0.0.1:{p}" for p in ports]
        for address in addresses:
            wait_healthy(address, "manylora.v1.GpuWorker")
        yield addresses, process.pid
    finally:
        stop_processes([process])


@contextlib.contextmanager
def running_routers(
    workers: Sequence[str], trees: Sequence[Path], extra_args: Sequence[str] = (), nice: int = 0
) -> Iterator[list[Router]]:
    """One router per tree (this checkout is REPO), each in front of all `workers`; `nice`
    lowers the routers' priority below the fakes' and the client's, so that a router on a
    shared machine is the one that falls behind (its streams lag, as at full load)."""
    processes: list[subprocess.Popen[bytes]] = []
    routers = []
    try:
        for tree in trees:
            port = free_port()
            command = [
                *(["nice", "-n", str(nice)] if nice else []),
                sys.executable,
                "-m",
                "services.router",
                "--port",
                str(port),
                "--workers",
                ",".join(workers),
                "--max-running",
                BIG,
                "--max-queued",
                BIG,
                "--log-level",
                "WARNING",
                *extra_args,
            ]
            processes.append(subprocess.Popen(command, cwd=tree, env=_env(tree)))
            name = "this tree" if tree.resolve() == REPO else str(tree)
            routers.append(Router(name, f"127.0.0.1:{port}", processes[-1].pid))
        for router in routers:
            wait_healthy(router.address, "manylora.v1.Router")
        yield routers
    finally:
        stop_processes(processes)
