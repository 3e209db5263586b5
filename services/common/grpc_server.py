"""Start and stop `grpc.aio` servers the same way in every service: health checks, server
reflection (so that `grpcurl` needs no .proto files), and, when configured, bearer-token
authentication (services.common.auth) and TLS or mutual TLS (services.common.tls)."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import AuthInterceptor
from services.common.config import ConfigError
from services.common.security_config import ServerSecurityConfig
from services.common.tls import ServerTls
from services.common.tracing import Tracing

logger = logging.getLogger(__name__)

# Adapters stream in chunks of a few MB; leave room above that for the envelope.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Routers ping workers every few seconds while streams are in flight (liveness); the
    # default policy (one ping per 5 minutes without data) would answer with GOAWAY.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
]
# gRPC sets SO_REUSEPORT by default: a second server on a taken port would start silently and
# take a random share of its calls. Off, binding a taken port fails.
_BIND_OPTIONS = [("grpc.so_reuseport", 0)]

AddServicer = Callable[[grpc.aio.Server], None]


class RunningServer:
    """A started server, its bound port and its health servicer."""

    def __init__(
        self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer
    ):
        self.server = server
        self.port = port
        self.health = health_servicer

    async def set_serving(self, service_names: Sequence[str], serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 2.0) -> None:
        await self.server.stop(grace)


async def start_server(
    add_servicers: Sequence[AddServicer],
    service_names: Sequence[str],
    host: str,
    port: int,
    security: ServerSecurityConfig | None = None,
    tracing: Tracing | None = None,
) -> RunningServer:
    """Bind on host:port (port 0 picks a free one), register health and reflection, start,
    mark SERVING. `security` (a service's config) turns on authentication and TLS; `tracing`
    a server span around every call (outermost, so that refused calls are traced too)."""
    if security is not None:
        security.check_security()  # a bad file is one line naming its flag, not a traceback
    keys = security.signing_keys() if security is not None else None
    tls = security.server_tls() if security is not None else None
    credentials = tls.credentials() if tls is not None else None
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracing is not None:
        interceptors.append(tracing.server_interceptor())
    if keys is not None:
        interceptors.append(AuthInterceptor(keys))
    server = grpc.aio.server(
        options=[*SERVER_OPTIONS, *_BIND_OPTIONS], interceptors=interceptors or None
    )
    for add in add_servicers:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = _bind(server, host, port, credentials)
    await server.start()
    running = RunningServer(server, bound, health_servicer)
    await running.set_serving(service_names, True)
    logger.info(
        "serving %s on %s:%d (%s, %s)",
        ", ".join(service_names),
        host,
        bound,
        _tls_mode(tls),
        "bearer tokens required" if keys is not None else "no authentication",
    )
    return running


def _tls_mode(tls: ServerTls | None) -> str:
    if tls is None:
        return "plaintext"
    return "mutual TLS" if tls.client_ca_file else "TLS"


def _bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """The bound port; `ConfigError` naming --port (or --host) when the address is taken or
    not ours. grpc returns 0 or raises RuntimeError depending on its version: both count."""
    field, problem = _bind_problem(host, port)
    if problem is None:
        address = f"{host}:{port}"
        try:
            if credentials is None:
                bound = int(server.add_insecure_port(address))
            else:
                bound = int(server.add_secure_port(address, credentials))
        except RuntimeError:
            bound = 0
        if bound:
            return bound
        problem = "the port is in use or the address is not local"
    raise ConfigError(field, f"cannot listen on {host}:{port}: {problem}")


def _bind_problem(host: str, port: int) -> tuple[str, str | None]:
    """Why host:port cannot be bound, found with a plain socket first, so that the operator
    reads our one line rather than gRPC's log of its failed bind (which stays the backstop)."""
    if port == 0:
        return "port", None
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        return "host", f"cannot resolve {host!r} ({exc})"
    # Like gRPC: fine when some resolved address binds, unless another one is taken.
    failures: list[OSError] = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "port", exc.strerror or str(exc)
                failures.append(exc)
    if failures and len(failures) == len(addresses):
        return "host", failures[0].strerror or str(failures[0])
    return "port", None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and local runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def wait_for_signal_then(stop: Callable[[], Awaitable[None]]) -> None:
    """Block until SIGINT or SIGTERM, then run `stop` (a service's clean shutdown)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    logger.info("shutting down")
    await stop()
