"""Under TLS the chart's probes run `python -m services.common.healthcheck` in the container;
here those very commands (files moved from the Secret's mount to a temporary folder, the
port to a real server's) check a server started with the chart's settings: mutual TLS, a
certificate naming what the chart's install notes list, tokens required. And the address a
worker advertises under TLS, computed by the chart's own shell line, is a name that
certificate holds."""

from __future__ import annotations

import asyncio
import datetime
import secrets
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common import healthcheck
from services.common.channels import ChannelSecurity
from services.common.grpc_server import start_server
from services.common.security_config import ServerSecurityConfig
from services.common.tls import ClientTls
from tests.deploy.chart import (
    CHART,
    GRPC_SERVERS,
    NAMESPACE,
    RELEASE,
    VALUE_SETS,
    only_container,
    port_named,
    render,
    workloads,
)
from tests.security.certs import Authority

MOUNT = "/etc/manylora/tls/"
PRODUCTION: dict[str, Any] = VALUE_SETS["production"]


def names_in_install_notes(values: dict[str, Any]) -> list[str]:
    """The names the chart tells the operator the certificate must hold (NOTES.txt)."""
    chart = helm_python.Chart.load(str(CHART))
    notes = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    text = notes["manylora/templates/NOTES.txt"]
    listed = text.split("must name:", 1)[1].split()
    assert len(listed) == 3, text
    return listed


def write_leaf(ca: Authority, folder: Path, dns_names: list[str]) -> None:
    """tls.crt and tls.key as the Secret holds them, for serverAuth and clientAuth."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "manylora")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    (folder / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (folder / "ca.crt").write_bytes(Path(ca.cert_file).read_bytes())


def secret_folder(tmp_path: Path, dns_names: list[str]) -> Path:
    folder = tmp_path / "tls"
    folder.mkdir()
    write_leaf(Authority.create(tmp_path), folder, dns_names)
    return folder


async def run_probes(folder: Path, key_file: Path) -> dict[tuple[str, str], int]:
    """Every exec probe of the production set against one server serving all three
    services under mutual TLS and tokens; exit status by (component, probe)."""
    security = ServerSecurityConfig(
        auth_key_file=str(key_file),
        tls_cert_file=str(folder / "tls.crt"),
        tls_key_file=str(folder / "tls.key"),
        tls_client_ca_file=str(folder / "ca.crt"),
    )
    server = await start_server([], list(GRPC_SERVERS.values()), "127.0.0.1", 0, security)
    results: dict[tuple[str, str], int] = {}
    try:
        found = workloads(render(PRODUCTION))
        for name in GRPC_SERVERS:
            container = only_container(found[name])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind not in container:
                    continue
                command = container[kind]["exec"]["command"]
                assert command[:3] == ["python", "-m", "services.common.healthcheck"]
                target = f"127.0.0.1:{port_named(container, 'grpc')}"
                assert command[3] == target
                args = [
                    a.replace(MOUNT, f"{folder}/").replace(target, f"127.0.0.1:{server.port}")
                    for a in command[3:]
                ]
                results[(name, kind)] = await asyncio.to_thread(healthcheck.main, args)
    finally:
        await server.stop(None)
    return results


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth.key"
    path.write_text(secrets.token_urlsafe(48) + "\n")
    return path


async def test_probes_pass_with_a_certificate_naming_what_the_notes_list(
    tmp_path: Path, key_file: Path
) -> None:
    folder = secret_folder(tmp_path, names_in_install_notes(PRODUCTION))
    results = await run_probes(folder, key_file)
    assert len(results) == 7  # readiness and liveness of 3 servers, the worker's startup
    assert set(results.values()) == {0}, results


async def test_a_certificate_without_the_workers_name_fails_their_probes(
    tmp_path: Path, key_file: Path
) -> None:
    """Guards the test above: the probes do check the name the certificate holds."""
    names = [n for n in names_in_install_notes(PRODUCTION) if not n.startswith("*.")]
    results = await run_probes(secret_folder(tmp_path, names), key_file)
    failed = {name for (name, _), status in results.items() if status != 0}
    assert failed == {"gpu-worker"}, results


def advertised_address(pod_ip: str) -> str:
    """What the worker's own command line sets, run by a shell as Kubernetes would run it
    ($$ is Kubernetes' escape of $), with the worker itself replaced by printenv."""
    container = only_container(workloads(render(PRODUCTION))["gpu-worker"])
    shell, flag, script = container["command"]
    assert (shell, flag) == ("sh", "-c")
    script = script.replace("$$", "$")
    assert script.endswith("python -m services.gpu_worker")
    script = (
        script.removesuffix("python -m services.gpu_worker") + "printenv MANYLORA_ADVERTISE_ADDRESS"
    )
    done = subprocess.run(
        ["sh", "-c", script], env={"POD_IP": pod_ip}, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


async def test_routers_can_verify_the_address_a_worker_advertises(tmp_path: Path) -> None:
    address = advertised_address("10.1.2.3")
    host, _, port = address.rpartition(":")
    assert host == f"10-1-2-3.{RELEASE}-manylora-gpu-worker.{NAMESPACE}.svc"
    assert port == "50051"
    folder = secret_folder(tmp_path, names_in_install_notes(PRODUCTION))
    security = ServerSecurityConfig(
        tls_cert_file=str(folder / "tls.crt"), tls_key_file=str(folder / "tls.key")
    )
    server = await start_server([], list(GRPC_SERVERS.values()), "127.0.0.1", 0, security)
    try:
        client = ChannelSecurity(ClientTls(str(folder / "ca.crt"), "", ""), None)
        # The router dials `host`; DNS aside, the handshake checks the certificate names it.
        ok, said = await asyncio.to_thread(
            healthcheck.check, f"127.0.0.1:{server.port}", "", 3.0, client, host
        )
        assert ok, said
        ok, said = await asyncio.to_thread(
            healthcheck.check, f"127.0.0.1:{server.port}", "", 3.0, client, "10-1-2-3.elsewhere"
        )
        assert not ok
    finally:
        await server.stop(None)
