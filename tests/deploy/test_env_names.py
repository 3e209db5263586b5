"""Every MANYLORA_* variable the chart sets (in `env`, or in a container's shell command) is a
setting of that service's config dataclass, and its value reads as that setting: the chart
cannot drift from the code (a renamed flag, a typo in `extraEnv`, a boolean written `yes
please`)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from services.adapter_store.config import AdapterStoreConfig
from services.common.config import ENV_PREFIX, env_name, load_config
from services.gpu_worker.serving.config import WorkerConfig
from services.openai_front.config import OpenAIFrontConfig
from services.router.config import RouterConfig
from tests.deploy.chart import VALUE_SETS, containers, render, workloads

CONFIGS: dict[str, type[Any]] = {
    "router": RouterConfig,
    "gpu-worker": WorkerConfig,
    "adapter-store": AdapterStoreConfig,
    "openai-front": OpenAIFrontConfig,
}
# Variables that are not settings: the pod's IP, which MANYLORA_ADVERTISE_ADDRESS refers to,
# and Triton's kernel cache directory, which Triton reads.
NOT_SETTINGS = {"POD_IP", "TRITON_CACHE_DIR"}
_IN_COMMAND = re.compile(r"\b(" + ENV_PREFIX + r"[A-Z0-9_]+)=")
# Every setting the chart can set (extraEnv too), to cover what the value sets leave out.
EVERYTHING_ON: dict[str, Any] = {
    **VALUE_SETS["production"],
    "tls": {"enabled": True, "existingSecret": "certs", "mutual": True},
    "openaiFront": {"extraEnv": {"MANYLORA_DEFAULT_MAX_TOKENS": 256}},
    "adapterStore": {"extraEnv": {"MANYLORA_MAX_RANK": 64}},
    "router": {"extraEnv": {"MANYLORA_LOAD_BOUND": 1.5}},
}
VALUE_SETS_AND_MORE = {**VALUE_SETS, "everything-on": EVERYTHING_ON}


def settings_set(container: dict[str, Any]) -> dict[str, str]:
    """name -> value of every MANYLORA_* variable the container sets."""
    found = {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}
    for word in container.get("command", []):
        found.update((name, "") for name in _IN_COMMAND.findall(word))
    return found


def mistakes(component: str, container: dict[str, Any]) -> list[str]:
    config = CONFIGS[component]
    known = {env_name(f.name) for f in dataclasses.fields(config)}
    out = []
    for name in settings_set(container):
        if name in NOT_SETTINGS:
            continue
        if name not in known:
            out.append(f"{component}: {name} is not a setting of {config.__name__}")
    return out


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS_AND_MORE))
def test_every_variable_the_chart_sets_is_a_setting(value_set: str) -> None:
    found = workloads(render(VALUE_SETS_AND_MORE[value_set]))
    assert set(CONFIGS) <= set(found)
    problems = []
    for component, config in CONFIGS.items():
        (container,) = containers(found[component])
        problems += mistakes(component, container)
        # And its value reads as the setting (the files it names are checked at start).
        env = {k: v for k, v in settings_set(container).items() if k not in NOT_SETTINGS}
        load_config(config, argv=[], env=env)
    assert not problems, "\n".join(problems)


def test_a_misspelt_variable_is_caught() -> None:
    """Guards the check above: a typo in extraEnv, and one in a template, are reported."""
    typo = {"gpuWorker": {"extraEnv": {"MANYLORA_MAX_NUM_SEQ": 8}}}
    (container,) = containers(workloads(render(typo))["gpu-worker"])
    assert mistakes("gpu-worker", container) == [
        "gpu-worker: MANYLORA_MAX_NUM_SEQ is not a setting of WorkerConfig"
    ]
    container = {"command": ['exec env MANYLORA_ADVERTISE_ADRESS="x:1" python -m x']}
    assert mistakes("gpu-worker", container) == [
        "gpu-worker: MANYLORA_ADVERTISE_ADRESS is not a setting of WorkerConfig"
    ]


def test_a_setting_of_another_service_is_caught() -> None:
    """The router has no MANYLORA_DATA_DIR: names are checked per service, not globally."""
    wrong = {"router": {"extraEnv": {"MANYLORA_DATA_DIR": "/data"}}}
    (container,) = containers(workloads(render(wrong))["router"])
    assert mistakes("router", container) == [
        "router: MANYLORA_DATA_DIR is not a setting of RouterConfig"
    ]
