"""Settings from flags and environment, and `python -m services.adapter_store` as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.adapter_store.config import AdapterStoreConfig
from services.adapter_store.server import SERVICE_NAME
from services.common import grpc_server
from services.common.config import ConfigError, load_config
from services.common.grpc_server import free_port, start_server
from tests.adapter_store.helpers import aio_channel, store_config

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


def test_store_dtype_is_one_of_its_words() -> None:
    config = load_config(AdapterStoreConfig, ["--store-dtype", "bfloat16"], env={})
    assert config.store_dtype == "bfloat16"
    assert load_config(AdapterStoreConfig, [], env={}).store_dtype == "as-uploaded"
    with pytest.raises(ConfigError, match=r"^--store-dtype \(MANYLORA_STORE_DTYPE\): 'int8'"):
        load_config(AdapterStoreConfig, ["--store-dtype", "int8"], env={})


def test_module_serves_until_sigterm_then_exits_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.adapter_store",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--log-level",
            "WARNING",
        ],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
    )
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


async def test_a_second_store_on_a_taken_port_is_refused_naming_the_flag(
    tmp_path: Path, start_store
) -> None:
    first = await start_store(store_config(tmp_path / "one"))
    with pytest.raises(ConfigError, match=r"^--port \(MANYLORA_PORT\): .*in use"):
        await start_store(store_config(tmp_path / "two", port=first.port))
    # With SO_REUSEPORT left on, the two would share the port's calls between them.
    async with aio_channel(first.port) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_start_server_refuses_a_taken_port_even_past_the_socket_check(monkeypatch) -> None:
    """gRPC's own bind result is checked too (the socket pre-check can race)."""

    async def two_servers() -> None:
        running = await start_server([], ["x"], "127.0.0.1", 0)
        try:
            monkeypatch.setattr(grpc_server, "_bind_problem", lambda host, port: ("port", None))
            with pytest.raises(ConfigError, match=r"^--port .*in use"):
                await start_server([], ["x"], "127.0.0.1", running.port)
        finally:
            await running.stop(None)

    asyncio.run(two_servers())
