"""The chart, rendered by Helm's engine with each value set, is valid Kubernetes: every object
against the API's own schemas (kubernetes-validate, strict: an unknown field fails), for the
oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest the validator
knows; and `helm lint --strict` finds nothing."""

from __future__ import annotations

from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.deploy.chart import CHART, VALUE_SETS, render

OLDEST = "1.27.0"  # native gRPC probes are GA from 1.27 (Chart.yaml's kubeVersion)
NEWEST = kubernetes_validate.utils.latest_version()


def test_oldest_version_is_the_charts_floor() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"].startswith(">=" + OLDEST)


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_every_object_matches_the_kubernetes_schema(value_set: str, version: str) -> None:
    objects = render(VALUE_SETS[value_set])
    assert len(objects) >= 10
    problems: list[str] = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{obj['kind']} {obj['metadata']['name']}: {exc}")
    assert not problems, "\n".join(problems)


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """Guards this file: a misspelt field and a probe port given as text fail validation."""
    (router,) = (
        o
        for o in render({})
        if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-router")
    )
    container: dict[str, Any] = router["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(router, NEWEST, strict=True)
    container["readinessProbe"] = container.pop("readinesProbe")
    container["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(router, NEWEST, strict=True)


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_helm_lint_is_clean(value_set: str) -> None:
    report = helm_python.lint(str(CHART), VALUE_SETS[value_set], strict=True)
    warnings = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not warnings, report
