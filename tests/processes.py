"""Services in their own processes (`python -m services.<name>`), for faults a test cannot
inflict on itself: SIGKILL, SIGSTOP, and SIGTERM's drain. Their output goes to a log file beside the
test's data, which a failing assertion can point at."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common.grpc_server import free_port

REPO = Path(__file__).resolve().parents[2]


class ServiceProcess:
    def __init__(
        self,
        module: str,
        args: list[str],
        log_dir: Path,
        metrics: bool = False,
        one_thread: bool = True,
    ):
        """`one_thread`: torch's intra-op threads at one (OMP_NUM_THREADS), so that several
        torch processes share two cores one thread each, not two apiece."""
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port() if metrics else 0
        self.log = log_dir / f"{module.rpartition('.')[2]}-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"}
        if one_thread:
            env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", module, "--port", str(self.port), *args]
        if metrics:
            command += ["--metrics-port", str(self.metrics_port)]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    async def wait_serving(self, timeout_s: float = 90.0) -> None:
        request = health_pb2.HealthCheckRequest(service="")
        async with asyncio.timeout(timeout_s):
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    assert self.process.poll() is None, f"{self.log.name} exited: see {self.log}"
                    try:
                        reply = await stub.Check(request, timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def wait_exit(self, timeout_s: float) -> int:
        async with asyncio.timeout(timeout_s):
            while self.process.poll() is None:
                await asyncio.sleep(0.05)
        return self.process.returncode

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    async def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """This process's Prometheus samples: name -> sorted labels -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return str(reply.read().decode())

        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
            for sample in family.samples:
                samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
        return samples
