"""Adapters fetched from the adapter store over gRPC, checked, and kept in host memory.

A request names an adapter id and a version (0: the newest). The source *resolves* that to an
identity, `AdapterKey` (id, version, sha256), and serves the adapter of that identity from
its host cache, fetching it on a miss. Resolutions are kept, but trusted only for
`version_ttl_s`: an older one is checked again with the store (`GetAdapterInfo`, no weights),
so a new upload or a delete reaches this worker within that bound even with no Redis at all.
When the store publishes change notices on Redis (`AdapterEventListener`), a notice drops the
id's resolutions at once. A resolution made while a notice for its id arrived is not kept
(the generation check), so a late answer can never undo a notice.

Requests hold the adapter object they were given, so they finish on the version they started
on; once the newest version of an id is known, older versions leave the host cache (a pinned
request for one fetches it again), and a deleted id leaves it entirely.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
from redis.asyncio import Redis
from redis.exceptions import RedisError

from manylora.v1 import adapter_store_pb2, common_pb2
from manylora.v1.adapter_store_pb2_grpc import AdapterStoreStub
from services.common.adapter_events import DELETE, AdapterEvent
from services.common.adapter_ref import adapter_ref
from services.common.channels import ChannelSecurity, aio_channel
from services.common.errors import InvalidArgument, NotFound, ServiceError, Unavailable
from services.common.grpc_server import SERVER_OPTIONS
from services.common.logging import request_id_metadata
from services.common.lora_format import AdapterKey, CanonicalAdapter
from services.common.single_flight import SingleFlight
from services.common.tasks import cancel_task
from services.gpu_worker.adapters.host_adapter_cache import HostAdapterCache

logger = logging.getLogger(__name__)

# A damaged transfer is retried once; twice in a row means something is wrong at the store.
FETCH_ATTEMPTS = 2
# A Llama-7B rank-8 adapter downloads in about 50 ms on the device's host; one still going
# after this long is large or slow, and lets the next in line start (_download_in_turn).
SLOW_FETCH_S = 1.0
DEFAULT_VERSION_TTL_S = 5.0


def _key_of(info: common_pb2.AdapterInfo) -> AdapterKey:
    return AdapterKey(info.adapter_id, info.version, info.sha256)


def _verified(
    info: common_pb2.AdapterInfo, parts: list[bytes], dtype: torch.dtype | None
) -> CanonicalAdapter | None:
    """The adapter in the joined `parts` with its identity from `info`, in `dtype` (None: as
    stored), or None when the bytes do not match the sha256 in `info`. (Joined here, on a
    thread: tens of MB copied on the event loop hold up every stream it serves.)"""
    blob = b"".join(parts)
    if hashlib.sha256(blob).hexdigest() != info.sha256:
        return None
    adapter = CanonicalAdapter.from_bytes(blob)
    adapter.adapter_id, adapter.version, adapter.sha256 = _key_of(info)
    return adapter if dtype is None else adapter.to("cpu", dtype)


@dataclass(frozen=True)
class _Resolution:
    key: AdapterKey
    at: float  # time.monotonic() when the store said so


class StoreAdapterSource:
    """An `AdapterSource` backed by the adapter store at `target` (host:port)."""

    def __init__(
        self,
        target: str,
        cache_max_bytes: int,
        timeout_s: float = 60.0,
        version_ttl_s: float = DEFAULT_VERSION_TTL_S,
        security: ChannelSecurity | None = None,
        dtype: torch.dtype | None = None,
        max_concurrent_fetches: int = 2,
        slow_fetch_s: float = SLOW_FETCH_S,
    ):
        """`dtype`: what adapters are kept in, the engine's, converted once when fetched
        rather than at each load into the pool (the store's PEFT uploads are often fp32:
        bf16 halves the host cache's bytes and each load's copy).

        `max_concurrent_fetches`: downloads at a time, and threads checking and converting
        what came. A cold worker's burst of first requests then gets its adapters one after
        another, in the order asked, the first within a download's time; all at once, each
        would come at the end of the burst, and the threads checking tens of MB each would
        hold the GIL from the event loop for hundreds of ms (benchmarks/adapter_fetch_bench).
        A download still going after `slow_fetch_s` stops counting against that bound."""
        self.target = target
        self._dtype = dtype
        self._max_fetches = max_concurrent_fetches
        self._slow_fetch_s = slow_fetch_s
        self._fetch_gate = asyncio.Semaphore(max_concurrent_fetches)
        self._checker: ThreadPoolExecutor | None = None
        self._security = security  # TLS and the token of calls to the store
        self.cache = HostAdapterCache(cache_max_bytes)
        self.hits = 0
        self.misses = 0
        self.version_ttl_s = version_ttl_s
        self._timeout_s = timeout_s
        # (id, requested version; 0 = newest) -> what it named when last asked.
        self._resolved: dict[tuple[str, int], _Resolution] = {}
        self._generation: Counter[str] = Counter()  # change notices seen per id
        self._fetches: SingleFlight[CanonicalAdapter] = SingleFlight()
        self._lookups: SingleFlight[AdapterKey] = SingleFlight()
        self._channel: grpc.aio.Channel | None = None

    async def get(self, adapter_id: str, version: int = 0) -> CanonicalAdapter:
        generation = self._generation[adapter_id]
        key = await self._resolve(adapter_id, version, generation)
        if key is not None:
            adapter = self.cache.get(key)
            if adapter is not None:
                self.hits += 1
                return adapter
        self.misses += 1
        wanted = key.version if key is not None else version
        # Keyed by generation too: a caller after a notice never joins a fetch from before it.
        return await self._fetches.run(
            ("fetch", adapter_id, wanted, generation),
            lambda: self._fetch_and_keep(adapter_id, version, wanted, generation),
        )

    def cached_ids(self) -> list[str]:
        return sorted({key.adapter_id for key in self.cache.list_keys()})

    def invalidate(self, adapter_id: str) -> None:
        """Forget everything about `adapter_id`: the next get asks the store again."""
        self._generation[adapter_id] += 1
        for ref in [r for r in self._resolved if r[0] == adapter_id]:
            del self._resolved[ref]
        self.cache.drop(adapter_id)

    def on_event(self, event: AdapterEvent) -> None:
        """A change notice from the store: the id's newest version is no longer known."""
        logger.info("adapter %s: %s of v%d noticed", event.adapter_id, event.event, event.version)
        if event.event == DELETE:
            self.invalidate(event.adapter_id)
            return
        self._generation[event.adapter_id] += 1
        self._resolved.pop((event.adapter_id, 0), None)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._checker is not None:
            self._checker.shutdown(wait=False, cancel_futures=True)
            self._checker = None

    async def _resolve(self, adapter_id: str, version: int, generation: int) -> AdapterKey | None:
        """The identity (id, version) names now; None when it was never resolved (the fetch
        then resolves it and brings the weights in one call)."""
        resolution = self._resolved.get((adapter_id, version))
        if resolution is None:
            return None
        if time.monotonic() - resolution.at < self.version_ttl_s:
            return resolution.key
        try:
            return await self._lookups.run(
                ("info", adapter_id, version, generation),
                lambda: self._look_up(adapter_id, version, generation),
            )
        except Unavailable as exc:
            # The store is down: serving what it last said beats refusing an adapter held
            # right here; the next get asks again.
            logger.warning("serving %s as last resolved: %s", _name(resolution.key), exc)
            return resolution.key

    async def _look_up(self, adapter_id: str, version: int, generation: int) -> AdapterKey:
        request = adapter_store_pb2.GetAdapterInfoRequest(adapter_id=adapter_id, version=version)
        try:
            info = await self._stub().GetAdapterInfo(
                request, timeout=self._timeout_s, metadata=request_id_metadata()
            )
        except grpc.aio.AioRpcError as exc:
            error = self._error_of(adapter_id, version, exc)
            if isinstance(error, NotFound):
                self._forget(adapter_id, version)
            raise error from exc
        key = _key_of(info)
        self._remember(adapter_id, version, key, generation)
        return key

    async def _fetch_and_keep(
        self, adapter_id: str, requested: int, version: int, generation: int
    ) -> CanonicalAdapter:
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            info, parts = await self._download_in_turn(adapter_id, version)
            if self._checker is None:
                self._checker = ThreadPoolExecutor(self._max_fetches, "adapter-check")
            loop = asyncio.get_running_loop()
            adapter = await loop.run_in_executor(self._checker, _verified, info, parts, self._dtype)
            if adapter is not None:
                evicted = self.cache.put(adapter.key, adapter)
                self._remember(adapter_id, requested, adapter.key, generation)
                logger.info(
                    "fetched adapter %s v%d (%d bytes)%s",
                    adapter_id,
                    info.version,
                    sum(map(len, parts)),
                    f", evicted {', '.join(map(_name, evicted))}" if evicted else "",
                )
                return adapter
            logger.warning(
                "adapter %s v%d failed its sha256 check (attempt %d of %d)",
                adapter_id,
                info.version,
                attempt,
                FETCH_ATTEMPTS,
            )
        raise Unavailable(
            f"adapter {adapter_id!r} from the store at {self.target} failed its sha256 check "
            f"{FETCH_ATTEMPTS} times"
        )

    def _remember(self, adapter_id: str, requested: int, key: AdapterKey, generation: int) -> None:
        """Keep what the store said, unless a notice for the id came meanwhile (it may be older
        than the notice's change). Knowing the newest retires the older versions."""
        if self._generation[adapter_id] != generation:
            return
        now = time.monotonic()
        self._resolved[(adapter_id, requested)] = _Resolution(key, now)
        self._resolved[(adapter_id, key.version)] = _Resolution(key, now)
        if requested == 0:
            dropped = self.cache.drop(adapter_id, below_version=key.version)
            for old in dropped:
                logger.info(
                    "adapter %s v%d superseded by v%d", adapter_id, old.version, key.version
                )

    def _forget(self, adapter_id: str, version: int) -> None:
        """The store no longer has (id, version); no version at all when `version` is 0."""
        if version == 0:
            self.invalidate(adapter_id)
            return
        self._resolved.pop((adapter_id, version), None)
        for key in self.cache.list_keys():
            if key.adapter_id == adapter_id and key.version == version:
                self.cache.pop(key)

    def _stub(self) -> AdapterStoreStub:
        if self._channel is None:
            self._channel = aio_channel(self.target, self._security, SERVER_OPTIONS)
        return AdapterStoreStub(self._channel)

    async def _download_in_turn(
        self, adapter_id: str, version: int
    ) -> tuple[common_pb2.AdapterInfo, list[bytes]]:
        """`_download` once one of `max_concurrent_fetches` places is free (FIFO: first asked,
        first served). A download still going after `slow_fetch_s` gives its place up and
        goes on beside the others: a huge adapter, or a store slow to send one, must not hold
        every other adapter back."""
        gate = self._fetch_gate
        await gate.acquire()
        held = True

        def give_up_place() -> None:
            nonlocal held
            if held:
                held = False
                gate.release()

        timer = asyncio.get_running_loop().call_later(self._slow_fetch_s, give_up_place)
        try:
            return await self._download(adapter_id, version)
        finally:
            timer.cancel()
            give_up_place()

    async def _download(
        self, adapter_id: str, version: int
    ) -> tuple[common_pb2.AdapterInfo, list[bytes]]:
        request = adapter_store_pb2.FetchAdapterRequest(adapter_id=adapter_id, version=version)
        info: common_pb2.AdapterInfo | None = None
        parts: list[bytes] = []
        try:
            chunks = self._stub().FetchAdapter(
                request, timeout=self._timeout_s, metadata=request_id_metadata()
            )
            async for chunk in chunks:
                if info is None:
                    info = chunk.info
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as exc:
            error = self._error_of(adapter_id, version, exc)
            if isinstance(error, NotFound):
                self._forget(adapter_id, version)
            raise error from exc
        if info is None or not info.sha256:
            raise Unavailable(f"the store at {self.target} sent {adapter_id!r} without its info")
        return info, parts

    def _error_of(self, adapter_id: str, version: int, exc: grpc.aio.AioRpcError) -> ServiceError:
        code, details = exc.code(), exc.details()
        name = adapter_ref(adapter_id, version)
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(details or f"unknown adapter {name!r}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(details)
        return Unavailable(
            f"cannot fetch adapter {name!r} from the store at {self.target}: {code.name}: {details}"
        )


def _name(key: AdapterKey) -> str:
    return f"{key.adapter_id}@{key.version}"


class AdapterEventListener:
    """Subscribes to the store's change notices on Redis and hands them to the source;
    reconnects every `retry_s` while Redis is unreachable (the TTL bounds staleness then)."""

    def __init__(
        self, source: StoreAdapterSource, redis_url: str, channel: str, retry_s: float = 1.0
    ):
        self._source = source
        self._url = redis_url
        self._channel = channel
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None
        self._warned = False  # an outage is logged once, and its end once
        self.subscribed = asyncio.Event()  # set while subscribed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_task(self._task)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except (RedisError, OSError) as exc:
                if not self._warned:
                    logger.warning(
                        "adapter notices from Redis at %s unavailable (%s); adapter versions "
                        "are re-checked every %.1f s until it is back",
                        self._url,
                        exc,
                        self._source.version_ttl_s,
                    )
                    self._warned = True
            self.subscribed.clear()
            await asyncio.sleep(self._retry_s)

    async def _listen(self) -> None:
        client = Redis.from_url(self._url, socket_connect_timeout=2, health_check_interval=5)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            async for message in pubsub.listen():
                if message["type"] == "subscribe":
                    logger.info("listening for adapter notices on %s", self._channel)
                    self._warned = False
                    self.subscribed.set()
                elif message["type"] == "message":
                    self._deliver(message["data"])
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def _deliver(self, data: bytes) -> None:
        try:
            event = AdapterEvent.decode(data)
        except ValueError as exc:
            logger.warning("ignored: %s", exc)
            return
        self._source.on_event(event)
