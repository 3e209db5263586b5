"""Start and stop `grpc.aio` servers the same way in every service, health service included."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

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
) -> RunningServer:
    """Bind on host:port (port 0 picks a free one), register health, start, mark SERVING."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    for add in add_servicers:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC server on {host}:{port}")
    await server.start()
    running = RunningServer(server, bound, health_servicer)
    await running.set_serving(service_names, True)
    logger.info("serving %s on %s:%d", ", ".join(service_names), host, bound)
    return running


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
