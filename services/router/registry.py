"""Reads the worker registrations that the GPU workers' heartbeats keep alive in Redis."""

from __future__ import annotations

import logging

import redis.asyncio

from manylora.v1 import gpu_worker_pb2
from services.common.worker_record import decode_record

logger = logging.getLogger(__name__)


class WorkerRegistry:
    def __init__(self, redis_url: str, prefix: str, timeout_s: float):
        self._prefix = prefix
        self._client = redis.asyncio.Redis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._failing = False

    async def read(self) -> dict[str, gpu_worker_pb2.GetStatsResponse] | None:
        """{address: stats} of the live registrations; None while Redis cannot be read."""
        try:
            keys = [key async for key in self._client.scan_iter(match=self._prefix + "*")]
            values = await self._client.mget(keys) if keys else []
        except (redis.RedisError, OSError) as exc:
            if not self._failing:
                logger.warning("cannot read worker registry (%s); keeping the last view", exc)
            self._failing = True
            return None
        self._failing = False
        workers: dict[str, gpu_worker_pb2.GetStatsResponse] = {}
        for key, value in zip(keys, values, strict=True):
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                address, stats = decode_record(value)
            except ValueError as exc:
                logger.warning("ignoring registry entry %r: %s", key, exc)
                continue
            workers[address] = stats
        return workers

    async def close(self) -> None:
        await self._client.aclose()
