"""The services without OpenTelemetry installed (its import blocked in a fresh interpreter):
they import and start their tracing off; asking for traces is one line naming the flag."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.modules["opentelemetry"] = None  # as if not installed: every import of it fails
import services.router.server, services.gpu_worker.serving.server, services.adapter_store.server
from services.common.config import ConfigError
from services.common.tracing import check_tracing, start_tracing
assert start_tracing("", "manylora-router") is None
check_tracing("")
for endpoint in ("console", "http://collector:4317"):
    try:
        check_tracing(endpoint)
    except ConfigError as exc:
        print(exc)
    else:
        raise SystemExit("no error without the packages")
"""


def test_services_run_without_opentelemetry():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'protos'}"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("--otel-endpoint (MANYLORA_OTEL_ENDPOINT): tracing needs ")
        assert "pip install 'manylora[tracing]'" in line
