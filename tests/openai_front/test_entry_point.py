"""`python -m services.openai_front` as a process: settings from flags over environment,
a bad setting as one line and exit status 2, serving a real router until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from services.common.config import ConfigError, load_config
from services.common.grpc_server import free_port
from services.openai_front.config import OpenAIFrontConfig
from tests.openai_front.conftest import BASE, Served, start_front

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"}
PROG = [sys.executable, "-m", "services.openai_front"]


def test_config_reads_flags_over_environment_over_defaults():
    env = {"MANYLORA_ROUTER": "10.0.0.1:50050", "MANYLORA_MODEL": "/models/Llama-2-7b-hf"}
    config = load_config(OpenAIFrontConfig, ["--model", "llama", "--port", "9000"], env=env)
    assert (config.router, config.model, config.port) == ("10.0.0.1:50050", "llama", 9000)
    assert (config.request_timeout_s, config.default_max_tokens) == (600.0, 0)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--router", "nowhere"], "--router (MANYLORA_ROUTER): 'nowhere' is not host:port"),
        (["--port", "70000"], "--port (MANYLORA_PORT): 70000 is above the maximum"),
        (["--request-timeout-s", "soon"], "--request-timeout-s (MANYLORA_REQUEST_TIMEOUT_S)"),
    ],
)
def test_bad_settings_are_one_line_and_status_2(args: list[str], line: str):
    done = subprocess.run([*PROG, *args], cwd=REPO, env=ENV, capture_output=True, timeout=60)
    assert done.returncode == 2
    stderr = done.stderr.decode().strip()
    assert "\n" not in stderr and line in stderr, stderr


async def test_a_taken_port_is_refused_naming_the_flag(served: Served):
    with pytest.raises(ConfigError, match=r"^--port \(MANYLORA_PORT\): cannot listen"):
        await start_front(served.router.port, port=served.front.port)


async def test_module_serves_a_router_until_sigterm(served: Served):
    port = free_port()
    process = subprocess.Popen(
        [*PROG, "--port", str(port), "--router", served.router_target, "--log-level", "WARNING"],
        cwd=REPO,
        env=ENV,
        stderr=subprocess.PIPE,
    )
    try:
        await asyncio.to_thread(wait_for_health, port)
        async with AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        ) as client:
            reply = await client.completions.create(model=BASE, prompt="hi", max_tokens=3)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 15)
    finally:
        process.kill()
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    assert code == 0, process.stderr.read().decode() if process.stderr else ""


def wait_for_health(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)
