"""The CPU stack as it is deployed, one process per service, for a benchmark: an adapter store
(temporary folder), a CPU worker of the dummy `tiny` model fetching from it, a router, and the
OpenAI HTTP front; each started with its `python -m` entry point on free ports and waited for
until healthy, all stopped (SIGTERM, then SIGKILL) when the context ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.common.grpc_server import free_port
from services.common.healthcheck import check

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 120.0
BIG = str(1 << 20)  # queue bounds that refuse nothing: the benchmark measures, not sheds


@dataclass
class StackAddresses:
    store: str
    worker: str
    router: str
    front_url: str  # the OpenAI API's base URL
    pids: dict[str, int] = field(default_factory=dict)  # service name -> process id


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux's /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(
    module: str, *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}", **(env_extra or {})}
    command = [sys.executable, "-m", module, *args, "--log-level", "WARNING"]
    return subprocess.Popen(command, cwd=REPO, env=env)


def wait_healthy(target: str, service: str) -> None:
    """Wait until `service` at `target` answers SERVING (RuntimeError after STARTUP_S)."""
    deadline = time.monotonic() + STARTUP_S
    while not check(target, service, timeout_s=1.0)[0]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target} ({service or 'server'}) never became healthy")
        time.sleep(0.2)


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each, newest first; then wait for each, killing what has not exited in 15 s."""
    for process in reversed(processes):
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def running_stack(model: str = "tiny", worker_threads: int = 0) -> Iterator[StackAddresses]:
    """`worker_threads`: torch's intra-op threads in the worker (OMP_NUM_THREADS); 0 = its
    default, one per core."""
    ports = {name: free_port() for name in ("store", "worker", "router", "front")}
    addresses = StackAddresses(
        store=f"127.0.0.1:{ports['store']}",
        worker=f"127.0.0.1:{ports['worker']}",
        router=f"127.0.0.1:{ports['router']}",
        front_url=f"http://127.0.0.1:{ports['front']}/v1",
    )
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="manylora-bench-") as data:
        try:
            processes.append(
                spawn(
                    "services.adapter_store",
                    "--port",
                    str(ports["store"]),
                    "--data-dir",
                    data,
                    "--base-model",
                    model,
                )
            )
            wait_healthy(addresses.store, "manylora.v1.AdapterStore")
            processes.append(
                spawn(
                    "services.gpu_worker",
                    "--port",
                    str(ports["worker"]),
                    "--model",
                    model,
                    "--device",
                    "cpu",
                    "--adapter-store",
                    addresses.store,
                    "--max-waiting",
                    BIG,
                    env_extra={"OMP_NUM_THREADS": str(worker_threads)} if worker_threads else None,
                )
            )
            wait_healthy(addresses.worker, "manylora.v1.GpuWorker")
            processes.append(
                spawn(
                    "services.router",
                    "--port",
                    str(ports["router"]),
                    "--workers",
                    addresses.worker,
                    "--adapter-store",
                    addresses.store,
                    "--max-running",
                    BIG,
                    "--max-queued",
                    BIG,
                )
            )
            wait_healthy(addresses.router, "manylora.v1.Router")
            processes.append(
                spawn(
                    "services.openai_front",
                    "--port",
                    str(ports["front"]),
                    "--router",
                    addresses.router,
                    "--model",
                    model,
                )
            )
            _wait_http(addresses.front_url.removesuffix("/v1") + "/health")
            names = ("store", "worker", "router", "front")
            addresses.pids = {n: p.pid for n, p in zip(names, processes, strict=True)}
            yield addresses
        finally:
            stop_processes(processes)
