"""Registration of a worker in Redis, for routers to find it.

Every `interval_s` the worker writes its record (services/common/worker_record.py: its
address and `GetStats` answer) with a time to live of `ttl_s`. A worker that dies simply stops
writing and its key expires; one that stops cleanly deletes its key. Routers scan the prefix
(services/router/registry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import redis.asyncio

from services.common.tasks import cancel_task
from services.common.worker_record import REGISTRY_PREFIX, encode_record
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.metrics import StatsSource

logger = logging.getLogger(__name__)

_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}


def advertised_address(advertise: str, host: str, port: int) -> str:
    """The address routers should dial: the configured one, else the bound host and port."""
    if advertise:
        return advertise
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"{host}:{port}"


class Heartbeat:
    """Keeps this worker's registration alive while the worker runs."""

    def __init__(
        self,
        redis_url: str,
        address: str,
        source: StatsSource,
        interval_s: float,
        ttl_s: float,
        prefix: str = REGISTRY_PREFIX,
    ):
        if ttl_s <= interval_s:
            raise ValueError(f"heartbeat ttl ({ttl_s}s) must exceed its interval ({interval_s}s)")
        self.address = address
        self.key = prefix + address
        self._source = source
        self._interval_s = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        timeout = max(interval_s, 0.5)
        self._client = redis.asyncio.Redis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def beat(self) -> None:
        """Write the registration once; a Redis outage is logged once, not raised."""
        record = encode_record(self.address, self._source())
        try:
            await self._client.set(self.key, record, px=self._ttl_ms)
        except (redis.RedisError, OSError) as exc:
            if not self._failing:
                logger.warning("heartbeat to Redis failed (%s); retrying every beat", exc)
            self._failing = True
            return
        if self._failing:
            logger.info("heartbeat to Redis works again")
        self._failing = False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.beat()
            except Exception:
                logger.exception("heartbeat failed")

    async def stop(self) -> None:
        """Stop beating and deregister, so that routers stop sending work at once."""
        if self._task is not None:
            await cancel_task(self._task)
        with contextlib.suppress(redis.RedisError, OSError):
            await self._client.delete(self.key)
        await self._client.aclose()


async def start_heartbeat(config: WorkerConfig, port: int, source: StatsSource) -> Heartbeat | None:
    """Register the worker when `registry_redis_url` is set; None otherwise."""
    if not config.registry_redis_url:
        return None
    address = advertised_address(config.advertise_address, config.host, port)
    heartbeat = Heartbeat(
        config.registry_redis_url,
        address,
        source,
        config.heartbeat_interval_s,
        config.heartbeat_ttl_s,
    )
    await heartbeat.start()
    logger.info("registering as %s in %s", address, config.registry_redis_url)
    return heartbeat
