"""The hot copy of canonical blobs and their infos in Redis, bounded by a byte budget.

Each (id, version) is one Redis hash `{prefix}adapter:{id}:v{N}` with fields `info` and
`blob`. The store keeps its own LRU index in Redis beside the entries: a sorted set of entry
keys scored by last access time, a hash of entry sizes and a running total. A Lua script adds
an entry and evicts the least recently used ones until the total fits the budget, atomically.
Keeping the index in Redis (not in this process) means it vanishes together with the data
when Redis restarts empty, so the two never disagree; the script builds key names, so it
needs a standalone Redis (not a cluster). Leave Redis' own `maxmemory` above the budget.

The store also publishes change notices (`services/common/adapter_events.py`) on the channel
`{prefix}events` after each upload and delete, for workers to drop their idea of an id's
newest version at once. A notice lost (Redis down, a worker not connected) costs only time:
workers re-check versions with the store on their own TTL.

Redis is optional and may fail at any time: every operation turns a Redis error into a miss
(or a no-op), marks Redis down and logs it once; meanwhile nothing waits on it. A background
probe pings Redis every `retry_s` (with a short timeout, on a connection of its own), so that
its state (and the health that reports it) follows Redis within seconds, traffic or not.
Entries of versions deleted while Redis was unreachable stay behind, unreachable (version
numbers are never reused), until the LRU drops them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.common.adapter_events import CHANNEL_SUFFIX, AdapterEvent
from services.common.tasks import cancel_task

logger = logging.getLogger(__name__)

StateCallback = Callable[[bool], Awaitable[None]]

# A probe slower than this counts as Redis down (a hung Redis is as useless as a dead one).
PROBE_TIMEOUT_S = 1.0

# Redis refuses a single value above 512 MB by default (proto-max-bulk-len).
MAX_ENTRY_BYTES = 512 * 1024 * 1024

# KEYS: lru zset, sizes hash, total counter, then entry keys. Shared by both scripts.
_REMOVE_FN = """
local function remove(entry)
  local size = tonumber(redis.call('HGET', KEYS[2], entry) or 0)
  redis.call('DEL', entry)
  redis.call('HDEL', KEYS[2], entry)
  redis.call('ZREM', KEYS[1], entry)
  return redis.call('DECRBY', KEYS[3], size)
end
"""
# ARGV: info, blob, access time, budget in bytes.
_PUT_SCRIPT = (
    _REMOVE_FN
    + """
local entry = KEYS[4]
local size = string.len(ARGV[1]) + string.len(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[2], entry) or 0)
redis.call('HSET', entry, 'info', ARGV[1], 'blob', ARGV[2])
redis.call('HSET', KEYS[2], entry, size)
redis.call('ZADD', KEYS[1], ARGV[3], entry)
local total = redis.call('INCRBY', KEYS[3], size - old)
local budget = tonumber(ARGV[4])
while total > budget do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 or oldest[1] == entry then break end
  total = remove(oldest[1])
end
return total
"""
)
_DELETE_SCRIPT = (
    _REMOVE_FN
    + """
for i = 4, #KEYS do remove(KEYS[i]) end
return 0
"""
)


class RedisCache:
    def __init__(
        self,
        url: str,
        max_bytes: int,
        prefix: str = "manylora:store:",
        retry_s: float = 2.0,
        on_state_change: StateCallback | None = None,
    ):
        self._url = url
        self._max_bytes = max_bytes
        self._prefix = prefix
        self._retry_s = retry_s
        self.on_state_change = on_state_change
        # One quick retry lets a pooled connection that died with a restarted Redis reconnect;
        # more would only delay the fall-back to disk.
        self._client = Redis.from_url(
            url, retry=Retry(NoBackoff(), 1), socket_connect_timeout=2, socket_timeout=30
        )
        self._probe_client = Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=PROBE_TIMEOUT_S,
            socket_timeout=PROBE_TIMEOUT_S,
        )
        self._index_keys = [prefix + "lru", prefix + "sizes", prefix + "bytes"]
        self.events_channel = prefix + CHANNEL_SUFFIX
        self._put = self._client.register_script(_PUT_SCRIPT)
        self._delete = self._client.register_script(_DELETE_SCRIPT)
        self._probe_task: asyncio.Task[None] | None = None
        self.available = True

    def entry_key(self, adapter_id: str, version: int) -> str:
        return f"{self._prefix}adapter:{adapter_id}:v{version}"

    async def start(self) -> None:
        try:
            await self._client.ping()
            logger.info("hot copy in Redis at %s, budget %d bytes", self._url, self._max_bytes)
        except (RedisError, OSError) as exc:
            await self._mark_down(exc)
        self._probe_task = asyncio.create_task(self._probe())

    async def close(self) -> None:
        if self._probe_task is not None:
            await cancel_task(self._probe_task)
        await self._client.aclose()
        await self._probe_client.aclose()

    async def get_entry(self, adapter_id: str, version: int) -> tuple[bytes, bytes] | None:
        """(info JSON, blob), or None on a miss or while Redis is down."""
        found = await self._read(adapter_id, version, "info", "blob")
        if found is None or found[0] is None or found[1] is None:
            return None
        return found[0], found[1]

    async def get_info(self, adapter_id: str, version: int) -> bytes | None:
        found = await self._read(adapter_id, version, "info")
        return None if found is None else found[0]

    async def put(self, adapter_id: str, version: int, info_json: bytes, blob: bytes) -> None:
        size = len(info_json) + len(blob)
        if not self.available or size > min(self._max_bytes, MAX_ENTRY_BYTES):
            return
        keys = [*self._index_keys, self.entry_key(adapter_id, version)]
        await self._call(self._put(keys=keys, args=[info_json, blob, time.time(), self._max_bytes]))

    async def delete(self, adapter_id: str, versions: list[int]) -> None:
        entries = [self.entry_key(adapter_id, v) for v in versions]
        if self.available and entries:
            await self._call(self._delete(keys=[*self._index_keys, *entries], args=[]))

    async def publish(self, event: AdapterEvent) -> None:
        """Tell listening workers about a change (best effort, like everything here)."""
        if self.available:
            await self._call(self._client.publish(self.events_channel, event.encode()))

    async def _read(self, adapter_id: str, version: int, *fields: str) -> list[Any] | None:
        if not self.available:
            return None
        key = self.entry_key(adapter_id, version)
        pipe = self._client.pipeline(transaction=False)
        pipe.hmget(key, list(fields))
        # XX: refresh the access time of an entry, never index one that is not there.
        pipe.zadd(self._index_keys[0], {key: time.time()}, xx=True)
        replies = await self._call(pipe.execute())
        return None if replies is None else list(replies[0])

    async def _call(self, pending: Awaitable[Any]) -> Any:
        try:
            return await pending
        except (RedisError, OSError) as exc:
            await self._mark_down(exc)
            return None

    async def _mark_down(self, exc: BaseException) -> None:
        if not self.available:
            return
        self.available = False
        logger.warning(
            "Redis at %s unreachable (%s); serving from disk until it is back", self._url, exc
        )
        await self._notify(False)

    async def _probe(self) -> None:
        """Runs from `start` to `close`: marks Redis down or back as pings fail or answer."""
        while True:
            await asyncio.sleep(self._retry_s)
            try:
                await self._probe_client.ping()
            except (RedisError, OSError) as exc:
                await self._mark_down(exc)
                continue
            if not self.available:
                self.available = True
                logger.info("Redis at %s is back; it refills as adapters are read", self._url)
                await self._notify(True)

    async def _notify(self, available: bool) -> None:
        if self.on_state_change is not None:
            await self.on_state_change(available)
