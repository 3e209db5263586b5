"""Render the Helm chart (deploy/helm/manylora) with Helm's own template engine, offline.

helm_python (PyPI helm-python-sdk) binds Helm's Go SDK, so this is what `helm template`
renders, without a helm binary or a cluster. Its `lookup` finds nothing, as `helm template`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import yaml

from manylora.v1 import adapter_store_pb2, gpu_worker_pb2, router_pb2

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "manylora"
RELEASE = "ml"
NAMESPACE = "serving"
# The value sets CI renders: the chart's defaults, and a production-like release (tokens,
# mutual TLS, the router's HPA on its queue, two GPU workers).
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": yaml.safe_load((CHART / "ci" / "production-values.yaml").read_text()),
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# The gRPC service each server marks SERVING once ready, from the protos (grpc.health.v1
# knows a service by its full name).
GRPC_SERVERS = {
    "router": router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
    "gpu-worker": gpu_worker_pb2.DESCRIPTOR.services_by_name["GpuWorker"].full_name,
    "adapter-store": adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].full_name,
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart makes with these values (over the chart's defaults)."""
    chart = helm_python.Chart.load(str(CHART))
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if not path.endswith(".yaml"):
            continue  # NOTES.txt
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def component(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"]["app.kubernetes.io/component"])


def workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments and StatefulSets by component."""
    return {component(o): o for o in objects if o["kind"] in WORKLOAD_KINDS}


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from workload["spec"]["template"]["spec"]["containers"]


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = containers(workload)
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's plain env entries (valueFrom ones map to "")."""
    return {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}


def port_named(container: dict[str, Any], name: str) -> int:
    (port,) = (p["containerPort"] for p in container["ports"] if p["name"] == name)
    return int(port)
