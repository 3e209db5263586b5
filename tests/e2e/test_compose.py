"""docker-compose.yml and the Dockerfile: `docker compose config -q` where compose exists,
and, always, a structural check of what compose cannot know (services, health checks,
start order, GPU reservation, and that commands and MANYLORA_* settings exist in the code)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from manylora.v1 import adapter_store_pb2, gpu_worker_pb2, router_pb2
from services.adapter_store.config import AdapterStoreConfig
from services.common.config import load_config
from services.gpu_worker.serving.config import WorkerConfig
from services.openai_front.config import OpenAIFrontConfig
from services.router.config import RouterConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
OURS = {
    "adapter_store": (AdapterStoreConfig, adapter_store_pb2, "AdapterStore"),
    "gpu_worker": (WorkerConfig, gpu_worker_pb2, "GpuWorker"),
    "router": (RouterConfig, router_pb2, "Router"),
}
START_ORDER = {
    "adapter_store": {"redis"},
    "gpu_worker": {"adapter_store", "redis"},
    "router": {"gpu_worker", "adapter_store", "redis"},
    "openai_front": {"router"},
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def compose_command() -> list[str]:
    """How to run compose here; skips the calling test, saying why, where there is none."""
    missing = "docker is not installed"
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
        why = (probe.stderr or probe.stdout).strip().splitlines()
        missing = "docker is installed but `docker compose` fails" + (f": {why[0]}" if why else "")
    found = shutil.which("docker-compose")
    if found:
        return [found]
    pytest.skip(
        f"no compose to validate docker-compose.yml ({missing}; no docker-compose either); "
        "test_compose_structure still checks the file"
    )


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved here
    assert isinstance(loaded, dict)
    return dict(loaded["services"])


def defaults(text: str) -> str:
    """${VAR:-default} with the variables unset, as compose reads it on a bare machine."""
    return _VARIABLE.sub(lambda m: m.group(2) or "", text)


def test_compose_config_validates_where_compose_exists():
    command = compose_command()
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_compose_structure(services: dict[str, Any]):
    assert set(services) == {"redis", "openai_front", *OURS}
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    for name, needs in START_ORDER.items():
        depends = services[name]["depends_on"]
        assert set(depends) == needs, name
        for other, condition in depends.items():
            assert condition == {"condition": "service_healthy"}, (name, other)
            assert "healthcheck" in services[other]


# Variables a library reads, by service: Triton's kernel cache (a compose volume).
LIBRARY_VARIABLES = {"gpu_worker": {"TRITON_CACHE_DIR"}}


@pytest.mark.parametrize("name", sorted(OURS))
def test_our_services_run_real_modules_with_real_settings(services: dict[str, Any], name: str):
    config_cls, pb2, service_name = OURS[name]
    service = services[name]
    command = service["command"]
    assert command[:2] == ["python", "-m"] and importlib.util.find_spec(command[2]), command
    env = {key: defaults(str(value)) for key, value in service["environment"].items()}
    # Every variable names a field, and every value parses (unknown ones would be ignored);
    # a library's own variables are named here, each with its reader.
    config: Any = load_config(config_cls, argv=[], env=env)
    fields = {f"MANYLORA_{field.upper()}" for field in vars(config)}
    assert set(env) <= fields | LIBRARY_VARIABLES.get(name, set()), set(env) - fields
    full_name = pb2.DESCRIPTOR.services_by_name[service_name].full_name
    healthcheck = service["healthcheck"]["test"]
    assert healthcheck[1:] == [
        "python",
        "-m",
        "services.common.healthcheck",
        f"127.0.0.1:{config.port}",
        full_name,
    ]
    for address in (env.get("MANYLORA_ADAPTER_STORE"), *env.get("MANYLORA_WORKERS", "").split(",")):
        if address:
            host, port = address.split(":")
            assert host in services and int(port) == int(
                services[host]["environment"]["MANYLORA_PORT"]
            )
    for key in ("MANYLORA_REDIS_URL", "MANYLORA_REGISTRY_REDIS_URL"):
        if key in env:
            assert env[key].startswith("redis://redis:6379/")


def test_openai_front_serves_the_routers_model_over_http(services: dict[str, Any]):
    service = services["openai_front"]
    command = service["command"]
    assert command[:2] == ["python", "-m"] and importlib.util.find_spec(command[2]), command
    env = {key: defaults(str(value)) for key, value in service["environment"].items()}
    config = load_config(OpenAIFrontConfig, argv=[], env=env)
    config.check()
    assert set(env) <= {f"MANYLORA_{field.upper()}" for field in vars(config)}
    host, port = config.router.split(":")
    assert host == "router" and int(port) == int(services["router"]["environment"]["MANYLORA_PORT"])
    worker_model = defaults(services["gpu_worker"]["environment"]["MANYLORA_MODEL"])
    assert config.model == worker_model
    assert f"${{MANYLORA_BIND:-127.0.0.1}}:{config.port}:{config.port}" in service["ports"]
    assert f"http://127.0.0.1:{config.port}/health" in " ".join(service["healthcheck"]["test"])
    assert service["build"] == "."


def test_routers_find_workers(services: dict[str, Any]):
    router = services["router"]["environment"]
    worker = services["gpu_worker"]["environment"]
    assert router["MANYLORA_REGISTRY_REDIS_URL"] == worker["MANYLORA_REGISTRY_REDIS_URL"]


def test_worker_reserves_a_gpu_and_sees_the_models(services: dict[str, Any]):
    worker = services["gpu_worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert any(defaults(v).endswith(":/models:ro") for v in worker["volumes"])
    assert defaults(worker["environment"]["MANYLORA_DUMMY"]) in ("true", "false")
    # Adapters cross to its engine process as files in /dev/shm: more than Docker's 64 MB.
    assert worker["shm_size"] == "2gb"


def test_dockerfile_builds_what_compose_runs(services: dict[str, Any]):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+", dockerfile, re.MULTILINE)
    for folder in ("protos/", "services/", "kernels/"):
        assert f"COPY {folder} {folder}" in dockerfile
    for name in OURS:
        assert services[name]["build"] == "."
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= set(ignored)


def test_docker_without_its_compose_plugin_skips_the_validation(monkeypatch, tmp_path: Path):
    """A machine with docker but no compose plugin must report a skip, not a pass."""
    fake_docker = tmp_path / "docker"
    fake_docker.write_text(
        "#!/bin/sh\necho \"docker: 'compose' is not a docker command.\" >&2\nexit 1\n"
    )
    fake_docker.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # this docker only, and no docker-compose
    with pytest.raises(pytest.skip.Exception, match="docker is installed but `docker compose`"):
        test_compose_config_validates_where_compose_exists()


def test_published_ports_listen_on_localhost_unless_told(services: dict[str, Any]):
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published, "nothing published: the check below would prove nothing"
    for port in published:
        assert str(port).startswith("${MANYLORA_BIND:-127.0.0.1}:"), port
        assert defaults(str(port)).startswith("127.0.0.1:"), port


def test_store_metrics_are_on_and_published(services: dict[str, Any]):
    store = services["adapter_store"]
    env = {key: defaults(str(value)) for key, value in store["environment"].items()}
    config = load_config(AdapterStoreConfig, argv=[], env=env)
    assert config.metrics_port == 9102
    assert f"127.0.0.1:{config.metrics_port}:{config.metrics_port}" in map(defaults, store["ports"])


def test_each_worker_is_pinned_to_its_own_gpu():
    """`count: 1` gives every worker the first GPU; each worker names its one device, and the
    commented example of a second worker, once uncommented, differs from the first only in it."""
    text = COMPOSE.read_text()
    example = re.search(r"^  # gpu_worker_1:\n((?:  #.*\n)+)", text, re.MULTILINE)
    assert example is not None
    uncommented = "  gpu_worker_1:\n" + re.sub(r"^  # ?", "  ", example.group(1), flags=re.M)
    loaded = yaml.safe_load(text.replace(example.group(0), uncommented))["services"]
    first, second = loaded["gpu_worker"], loaded["gpu_worker_1"]
    devices = [s["deploy"]["resources"]["reservations"]["devices"] for s in (first, second)]
    for (device,) in devices:
        assert "count" not in device and len(device["device_ids"]) == 1
    assert [defaults(d[0]["device_ids"][0]) for d in devices] == ["0", "1"]
    assert {k: v for k, v in first.items() if k != "deploy"} == {
        k: v for k, v in second.items() if k != "deploy"
    }


def test_image_installs_the_tested_torch_and_triton():
    with open(ROOT / "pyproject.toml", "rb") as fh:
        extras = tomllib.load(fh)["project"]["optional-dependencies"]
    gpu = dict(pin.split("==") for pin in extras["gpu"])
    # The same Triton as the CPU suite's kernel tests (its interpreter), and as the device's.
    assert f"triton=={gpu['triton']}" in extras["test"]
    torch_minor = ".".join(gpu["torch"].split(".")[:2])
    measured = f"torch {torch_minor} + triton {gpu['triton']}"
    assert measured in (ROOT / "BENCHMARKS.md").read_text()
    assert "['optional-dependencies']['gpu']" in (ROOT / "Dockerfile").read_text()
