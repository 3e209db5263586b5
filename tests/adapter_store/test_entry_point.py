"""Settings from flags and environment, and `python -m services.adapter_store` as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.adapter_store.config import AdapterStoreConfig
from services.adapter_store.server import SERVICE_NAME
from services.common.config import load_config
from services.common.grpc_server import free_port

REPO = Path(__file__).resolve().parents[2]


def test_config_reads_flags_over_environment_over_defaults() -> None:
    env = {"MANYLORA_DATA_DIR": "/from/env", "MANYLORA_REDIS_URL": "redis://h:1/0"}
    config = load_config(
        AdapterStoreConfig, ["--data-dir", "/from/flag", "--max-rank", "64"], env=env
    )
    assert config.data_dir == "/from/flag"
    assert config.redis_url == "redis://h:1/0"
    assert config.max_rank == 64
    assert (config.port, config.base_model, config.fetch_chunk_bytes) == (50052, "tiny", 2 << 20)


def test_module_serves_until_sigterm_then_exits_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.adapter_store", "--port", str(port),
         "--data-dir", str(tmp_path / "data"), "--log-level", "WARNING"],
        cwd=REPO, env=env, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
    finally:
        process.kill()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert code == 0, process.stderr.read().decode() if process.stderr else ""
    assert (tmp_path / "data" / ".tmp").is_dir()
