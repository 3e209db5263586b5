"""Assemble the front from its config and serve it: `start_openai_front` returns a handle with
its port and an async `stop()`, for `python -m services.openai_front`, tests and demos that run
the front inside their own event loop."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.common.config import ConfigError
from services.common.grpc_server import wait_for_signal_then
from services.common.metrics import MetricsServer, start_metrics_server
from services.openai_front.config import OpenAIFrontConfig
from services.openai_front.handlers import Routes, add_request_id, make_middleware
from services.openai_front.metrics import FrontMetrics
from services.openai_front.router_client import RouterClient

logger = logging.getLogger(__name__)


class OpenAIFront:
    """A running front."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        router: RouterClient,
        metrics: FrontMetrics,
    ):
        self._runner = runner
        self.host = host
        self.port = port
        self._router = router
        self.metrics = metrics
        self.metrics_server: MetricsServer | None = None

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API, as OpenAI's clients take it."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    async def stop(self) -> None:
        """Stop listening, end the streams in flight (their router calls are cancelled)."""
        await self._runner.cleanup()
        await self._router.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)


def build_app(
    config: OpenAIFrontConfig, router: RouterClient, metrics: FrontMetrics
) -> web.Application:
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[make_middleware(metrics)]
    )
    Routes(config, router, metrics).add_to(app)
    app.on_response_prepare.append(add_request_id)
    return app


async def start_openai_front(config: OpenAIFrontConfig) -> OpenAIFront:
    """Listen on config.host:config.port (0 picks a free port); the router is dialled lazily,
    so the front starts whether or not the router is up (calls meanwhile get 503)."""
    config.check()
    router = RouterClient(config.router, config.router_tls())
    metrics = FrontMetrics()
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # router call, even while no token is being written (queued, or in a long prefill).
    runner = web.AppRunner(
        build_app(config, router, metrics), handler_cancellation=True, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await router.close()
        raise ConfigError(
            "port", f"cannot listen on {config.host}:{config.port}: {exc.strerror}"
        ) from None
    port = int(runner.addresses[0][1])
    front = OpenAIFront(runner, config.host, port, router, metrics)
    try:
        if config.metrics_port:
            front.metrics_server = start_metrics_server(
                config.metrics_port, metrics.registry, config.host
            )
    except BaseException:
        await front.stop()
        raise
    logger.info(
        "serving the OpenAI API on http://%s:%d/v1 for the router at %s (base model %r)",
        config.host,
        port,
        config.router,
        config.model,
    )
    return front


async def serve(config: OpenAIFrontConfig) -> None:
    front = await start_openai_front(config)
    await wait_for_signal_then(front.stop)
