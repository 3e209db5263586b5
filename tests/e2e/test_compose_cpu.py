"""docker-compose.cpu.yml over docker-compose.yml, and the Dockerfile's build arguments: what
`make compose-test` runs for real (tools/compose/compose_test.sh), checked here for what a
mistake would only show after minutes of image building."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.adapter_store.config import AdapterStoreConfig
from services.common.config import load_config
from services.gpu_worker.serving.config import WorkerConfig
from services.openai_front.config import OpenAIFrontConfig
from tests.e2e.test_compose import COMPOSE, OURS, ROOT, compose_command, defaults

CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
RESET = object()  # compose's `!reset` tag: the key is removed from what it overrides


class ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it, with its `!reset` tag."""


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def services_of(path: Path) -> dict[str, Any]:
    loaded = yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader, with !reset
    assert isinstance(loaded, dict)
    return dict(loaded["services"])


@pytest.fixture(scope="module")
def main() -> dict[str, Any]:
    return services_of(COMPOSE)


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return services_of(CPU)


def environment(main: dict[str, Any], cpu: dict[str, Any], name: str) -> dict[str, str]:
    """A service's variables with the override's laid over (compose merges them by name), and
    every ${VAR:-default} at its default."""
    merged = {**main[name].get("environment", {}), **cpu.get(name, {}).get("environment", {})}
    return {key: defaults(str(value)) for key, value in merged.items()}


def test_cpu_override_validates_where_compose_exists():
    command = compose_command()
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "-f", str(CPU), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_cpu_override_only_overrides(main: dict[str, Any], cpu: dict[str, Any]):
    assert set(cpu) <= set(main), set(cpu) - set(main)
    assert {*OURS, "openai_front"} <= set(cpu)


def test_the_worker_runs_on_the_cpu_and_reserves_no_gpu(main: dict[str, Any], cpu: dict[str, Any]):
    env = environment(main, cpu, "gpu_worker")
    config: Any = load_config(WorkerConfig, argv=[], env=env)
    assert config.device == "cpu"
    assert config.model == "tiny"
    # Without the reset, compose keeps the GPU reservation and fails where there is no GPU.
    assert "deploy" in main["gpu_worker"] and cpu["gpu_worker"]["deploy"] is RESET


def test_the_store_and_the_front_name_the_workers_model(main: dict[str, Any], cpu: dict[str, Any]):
    worker: Any = load_config(WorkerConfig, argv=[], env=environment(main, cpu, "gpu_worker"))
    front = load_config(OpenAIFrontConfig, argv=[], env=environment(main, cpu, "openai_front"))
    store = load_config(AdapterStoreConfig, argv=[], env=environment(main, cpu, "adapter_store"))
    assert front.model == worker.model == store.base_model


def test_every_service_of_ours_runs_one_cpu_image(main: dict[str, Any], cpu: dict[str, Any]):
    arguments = set(re.findall(r"^ARG (\w+)", DOCKERFILE.read_text(), re.MULTILINE))
    builds = {name: cpu[name]["build"] for name in (*OURS, "openai_front")}
    images = {cpu[name]["image"] for name in builds}
    # One image, and not the GPU one's tag: a CPU build never stands in for the GPU image.
    assert len(images) == 1 and images != {main["router"]["image"]}
    first = next(iter(builds.values()))
    assert all(build == first for build in builds.values())
    assert first["context"] == "." and set(first["args"]) <= arguments
    assert defaults(first["args"]["TORCH_SPEC"]).startswith("torch==")


def requirements(torch_spec: str, tmp_path: Path) -> list[str]:
    """What the Dockerfile's requirement step writes, run as the image runs it (its `python -c`
    program, with the shell's line continuations joined, and TORCH_SPEC set)."""
    text = DOCKERFILE.read_text()
    match = re.search(r'RUN python -c "(.*?)"\s*\\\n\s*> /tmp/requirements.txt', text, re.DOTALL)
    assert match is not None, "the Dockerfile no longer writes /tmp/requirements.txt this way"
    program = match.group(1).replace("\\\n", "")
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        env={"TORCH_SPEC": torch_spec},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_image_installs_the_gpu_extra_by_default(tmp_path: Path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["optional-dependencies"]["gpu"] + project["dependencies"]
    assert requirements("", tmp_path) == wanted


def test_a_torch_spec_replaces_the_gpu_extra(tmp_path: Path):
    """The CPU image: that torch, and no Triton (the CPU runs no Triton kernel) and no CUDA
    torch pin beside it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    written = requirements("torch==2.13.0+cpu", tmp_path)
    assert written == ["torch==2.13.0+cpu", *project["dependencies"]]
    assert not any(line.startswith("triton") for line in written)


def test_base_image_is_a_build_argument():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+\nFROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)


def test_ci_runs_the_compose_test_after_the_suite():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines.index("make test") < lines.index("make compose-test")


def test_compose_test_skips_only_saying_why_where_containers_cannot_run(tmp_path: Path):
    """A podman that is installed but cannot work here (a sandbox without the kernel features):
    `make compose-test` reports a skip and why, and exits 0, before building anything."""
    fake = tmp_path / "bin"
    fake.mkdir()
    podman = fake / "podman"
    podman.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "podman version 9.9"; exit 0; }\n'
        'echo "Error: cannot set up namespaces: operation not permitted" >&2\nexit 125\n'
    )
    compose = fake / "podman-compose"
    compose.write_text("#!/bin/sh\necho podman-compose version 9.9\n")
    docker = fake / "docker"  # installed, with no engine to answer
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    for tool in (podman, compose, docker):
        tool.chmod(0o755)
    result = subprocess.run(
        ["bash", str(ROOT / "tools" / "compose" / "compose_test.sh")],
        env={
            "PATH": f"{fake}:/usr/bin:/bin",
            "PODMAN_COMPOSE": str(compose),
            "COMPOSE_TEST_DIR": str(tmp_path / "work"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "compose-test: SKIPPED: podman is installed but does not work here" in result.stdout
    assert "operation not permitted" in result.stdout
