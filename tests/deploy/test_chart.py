"""What the rendered chart must hold beyond the API schemas: gRPC probes on the servers' own
ports and health service names, resources on every container, one GPU per worker,
disruption budgets, the router's autoscaler on a metric the router really exports, a single
store on a volume, and one-line refusals of values that cannot work."""

from __future__ import annotations

import re
from typing import Any

import helm_python
import pytest
from prometheus_client import generate_latest

from services.router.admission import Admission
from services.router.metrics import RouterMetrics
from tests.deploy.chart import (
    GRPC_SERVERS,
    VALUE_SETS,
    WORKLOAD_KINDS,
    component,
    containers,
    env_of,
    only_container,
    port_named,
    render,
    workloads,
)

TLS = {"tls": {"enabled": True, "existingSecret": "certs"}}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(VALUE_SETS[request.param])


def test_plaintext_probes_are_native_grpc_probes_of_the_servers_services() -> None:
    found = workloads(render({}))
    for name, service in GRPC_SERVERS.items():
        container = only_container(found[name])
        port = port_named(container, "grpc")
        assert env_of(container)["MANYLORA_PORT"] == str(port), name
        readiness, liveness = container["readinessProbe"], container["livenessProbe"]
        assert readiness["grpc"] == {"port": port, "service": service}, name
        # Liveness asks for the whole server (""): alive even while not ready.
        assert liveness["grpc"] == {"port": port, "service": ""}, name
    worker = only_container(found["gpu-worker"])
    assert worker["startupProbe"]["grpc"] == {"port": port_named(worker, "grpc"), "service": ""}


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_probes_run_the_images_health_check_with_the_certificates(mutual: bool) -> None:
    """The kubelet's gRPC probe speaks plaintext only; under TLS the container checks itself."""
    values = {"tls": {**TLS["tls"], "mutual": mutual}}
    found = workloads(render(values))
    for name, service in GRPC_SERVERS.items():
        container = only_container(found[name])
        port = port_named(container, "grpc")
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert "grpc" not in probe
            command = probe["exec"]["command"]
            assert command[:5] == [
                "python",
                "-m",
                "services.common.healthcheck",
                f"127.0.0.1:{port}",
                service if kind == "readinessProbe" else "",
            ], name
            flags = dict(arg.split("=", 1) for arg in command[5:])
            assert flags["--tls-ca-file"].startswith(mounts["tls"] + "/"), name
            assert flags["--tls-server-name"], name
            assert ("--tls-cert-file" in flags) == mutual, name


def test_every_container_has_requests_and_a_memory_limit(objects: list[dict[str, Any]]) -> None:
    for name, workload in workloads(objects).items():
        for container in containers(workload):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), name
            assert "memory" in resources["limits"], name


def test_each_gpu_worker_pod_gets_exactly_one_gpu(objects: list[dict[str, Any]]) -> None:
    worker = workloads(objects)["gpu-worker"]
    for container in containers(worker):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    # A rolling update must not ask for a GPU more than the workers hold.
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    others = [w for n, w in workloads(objects).items() if n != "gpu-worker"]
    for workload in others:
        for container in containers(workload):
            assert "nvidia.com/gpu" not in str(container["resources"])


def test_every_service_workload_has_a_disruption_budget(objects: list[dict[str, Any]]) -> None:
    budgets = {component(o): o for o in objects if o["kind"] == "PodDisruptionBudget"}
    for name, workload in workloads(objects).items():
        if name == "redis":
            continue  # one cache and registry pod; it refills within seconds
        assert name in budgets, f"no PodDisruptionBudget for {name}"
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = budgets[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items(), name


def test_routers_are_several_and_the_store_is_one_on_a_volume(
    objects: list[dict[str, Any]],
) -> None:
    found = workloads(objects)
    router = found["router"]
    hpa = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    if hpa:  # the autoscaler owns the count
        assert "replicas" not in router["spec"] and hpa[0]["spec"]["minReplicas"] >= 2
    else:
        assert router["spec"]["replicas"] >= 2
    store = found["adapter-store"]
    assert store["kind"] == "StatefulSet" and store["spec"]["replicas"] == 1
    (claim,) = store["spec"]["volumeClaimTemplates"]
    container = only_container(store)
    (mount,) = (m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert env_of(container)["MANYLORA_DATA_DIR"].startswith(mount["mountPath"] + "/")


def test_the_workers_kernel_cache_is_on_a_volume_of_the_pod(objects: list[dict[str, Any]]) -> None:
    """Triton writes its compiled kernels where TRITON_CACHE_DIR says: a volume of the pod,
    so a restarted container does not compile them again inside served steps."""
    worker = workloads(objects)["gpu-worker"]
    container = only_container(worker)
    cache = env_of(container)["TRITON_CACHE_DIR"]
    (mount,) = (m for m in container["volumeMounts"] if m["mountPath"] == cache)
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]]["emptyDir"]["sizeLimit"] == "2Gi"


def test_the_workers_dev_shm_is_memory_of_the_pod(objects: list[dict[str, Any]]) -> None:
    """Adapters cross to the engine process as files in /dev/shm: a container runtime's
    default (64 MB) holds few, so the chart mounts a memory-backed volume there."""
    worker = workloads(objects)["gpu-worker"]
    container = only_container(worker)
    (mount,) = (m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


def _router_metric_names() -> str:
    class NoWorkers:
        def counts(self) -> tuple[int, int]:
            return 0, 0

    metrics = RouterMetrics(Admission(4, 8), NoWorkers())  # type: ignore[arg-type]
    return generate_latest(metrics.registry).decode()


@pytest.mark.parametrize("metric", ["queue", "cpu"])
def test_router_autoscaler_on_its_queue_or_cpu(metric: str) -> None:
    values = {"router": {"autoscaling": {"enabled": True, "metric": metric}}}
    objects = render(values)
    (hpa,) = (o for o in objects if o["kind"] == "HorizontalPodAutoscaler")
    router = workloads(objects)["router"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == router["metadata"]["name"]
    (target,) = hpa["spec"]["metrics"]
    if metric == "cpu":
        assert target["resource"]["name"] == "cpu"
        return
    name = target["pods"]["metric"]["name"]
    # A metrics adapter serves Prometheus' `manylora:num_requests_waiting` under this name
    # (the custom metrics API takes no colon); the router must export that gauge.
    prometheus_name = name.replace("manylora_", "manylora:", 1)
    assert f"\n{prometheus_name} " in _router_metric_names()


def test_no_autoscaler_unless_asked() -> None:
    assert not [o for o in render({}) if o["kind"] == "HorizontalPodAutoscaler"]


def test_workers_advertise_an_address_routers_can_dial() -> None:
    plain = only_container(workloads(render({}))["gpu-worker"])
    env = plain["env"]
    (pod_ip,) = (i for i, e in enumerate(env) if e["name"] == "POD_IP")
    (advertise,) = (i for i, e in enumerate(env) if e["name"] == "MANYLORA_ADVERTISE_ADDRESS")
    # Kubernetes expands $(POD_IP) only when POD_IP comes earlier in the list.
    assert pod_ip < advertise
    assert env[advertise]["value"] == f"$(POD_IP):{port_named(plain, 'grpc')}"
    tls = only_container(workloads(render(TLS))["gpu-worker"])
    script = tls["command"][-1]
    # Kubernetes turns $$ into $, for the shell to expand.
    assert '"$$(echo "$$POD_IP" | tr . -).' in script and "MANYLORA_ADVERTISE_ADDRESS" in script


def test_secrets_are_mounted_files_never_values() -> None:
    values: dict[str, Any] = {**VALUE_SETS["production"]}
    for name, workload in workloads(render(values)).items():
        for container in containers(workload):
            for entry in container.get("env", []):
                if entry["name"].endswith("_FILE"):
                    assert entry["value"].startswith("/etc/manylora/"), (name, entry)
                assert "BEGIN" not in str(entry.get("value", "")), (name, entry)


def test_the_chart_makes_the_auth_secret_only_without_an_existing_one() -> None:
    made = render({"auth": {"enabled": True, "signingKey": "k" * 64}})
    (secret,) = (o for o in made if o["kind"] == "Secret")
    assert secret["stringData"] == {"auth.key": "k" * 64}
    given = render({"auth": {"enabled": True, "existingSecret": "mine"}})
    assert not [o for o in given if o["kind"] == "Secret"]
    router = only_container(workloads(given)["router"])
    assert env_of(router)["MANYLORA_AUTH_KEY_FILE"] == "/etc/manylora/auth/auth.key"
    volumes = workloads(given)["router"]["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "auth",
        "secret": {
            "secretName": "mine",
            "defaultMode": 0o400,
            "items": [{"key": "auth.key", "path": "auth.key"}],
        },
    } in volumes


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"tls": {"enabled": True}}, "tls.existingSecret"),
        ({"auth": {"enabled": True}}, "auth.signingKey"),
        ({"redis": {"enabled": False}}, "redis.url"),
        # values.schema.json: a value out of its choices, a misspelt key, a variable name
        ({"router": {"autoscaling": {"enabled": True, "metric": "gpu"}}}, "/router/autoscaling"),
        ({"gpuWorkers": {"replicas": 4}}, "'gpuWorkers' not allowed"),
        ({"gpuWorker": {"extraEnv": {"max_num_seqs": 8}}}, "'max_num_seqs' does not match"),
    ],
)
def test_values_that_cannot_work_fail_naming_the_value(values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(named)):
        render(values)


def test_no_service_link_variables(objects: list[dict[str, Any]]) -> None:
    """Kubernetes would give each pod MANYLORA_ROUTER_PORT and the like for a release named
    manylora: variables of the settings' prefix that no one set."""
    for name, workload in workloads(objects).items():
        assert workload["spec"]["template"]["spec"]["enableServiceLinks"] is False, name


def test_only_workload_kinds_hold_pods(objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Pod", "ReplicaSet", "DaemonSet"}
    assert set(WORKLOAD_KINDS) <= kinds


@pytest.mark.parametrize("grace", [30, 120, 3])
def test_workers_drain_within_their_grace_period(grace: int) -> None:
    """Running streams get the pod's grace less 5 s: the kubelet's SIGKILL must not land
    while the worker is still draining (and never a negative drain)."""
    pod = workloads(render({"gpuWorker": {"terminationGracePeriodSeconds": grace}}))["gpu-worker"]
    spec = pod["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == grace
    drain = {e["name"]: e.get("value") for e in only_container(pod)["env"]}
    assert float(drain["MANYLORA_DRAIN_TIMEOUT_S"]) == max(0, grace - 5)
