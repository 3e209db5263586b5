"""Adapters fetched from the adapter store over gRPC, checked, and kept in host memory.

Each id is fetched at its newest version the first time it is asked for, then served from
the host cache until evicted; `invalidate` drops one so that the next `get` fetches again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import grpc

from manylora.v1 import adapter_store_pb2, common_pb2
from manylora.v1.adapter_store_pb2_grpc import AdapterStoreStub
from services.common.errors import InvalidArgument, NotFound, ServiceError, Unavailable
from services.common.grpc_server import SERVER_OPTIONS
from services.common.logging import request_id_metadata
from services.common.lora_format import CanonicalAdapter
from services.common.single_flight import SingleFlight
from services.gpu_worker.host_adapter_cache import HostAdapterCache

logger = logging.getLogger(__name__)

# A damaged transfer is retried once; twice in a row means something is wrong at the store.
FETCH_ATTEMPTS = 2


def _verified(info: common_pb2.AdapterInfo, blob: bytes) -> CanonicalAdapter | None:
    """The adapter in `blob`, or None when the blob does not match the sha256 in `info`."""
    if hashlib.sha256(blob).hexdigest() != info.sha256:
        return None
    return CanonicalAdapter.from_bytes(blob)


class StoreAdapterSource:
    """An `AdapterSource` backed by the adapter store at `target` (host:port)."""

    def __init__(self, target: str, cache_max_bytes: int, timeout_s: float = 60.0):
        self.target = target
        self.cache = HostAdapterCache(cache_max_bytes)
        self.hits = 0
        self.misses = 0
        self._timeout_s = timeout_s
        self._fetches: SingleFlight[CanonicalAdapter] = SingleFlight()
        self._channel: grpc.aio.Channel | None = None

    async def get(self, adapter_id: str) -> CanonicalAdapter:
        adapter = self.cache.get(adapter_id)
        if adapter is not None:
            self.hits += 1
            return adapter
        self.misses += 1
        return await self._fetches.run(adapter_id, lambda: self._fetch_and_keep(adapter_id))

    def cached_ids(self) -> list[str]:
        return sorted(self.cache.ids())

    def invalidate(self, adapter_id: str) -> None:
        self.cache.pop(adapter_id)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _fetch_and_keep(self, adapter_id: str) -> CanonicalAdapter:
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            info, blob = await self._download(adapter_id)
            adapter = await asyncio.to_thread(_verified, info, blob)
            if adapter is not None:
                evicted = self.cache.put(adapter_id, adapter)
                logger.info(
                    "fetched adapter %s v%d (%d bytes)%s", adapter_id, info.version, len(blob),
                    f", evicted {', '.join(evicted)}" if evicted else "",
                )  # fmt: skip
                return adapter
            logger.warning(
                "adapter %s v%d failed its sha256 check (attempt %d of %d)",
                adapter_id, info.version, attempt, FETCH_ATTEMPTS,
            )  # fmt: skip
        raise Unavailable(
            f"adapter {adapter_id!r} from the store at {self.target} failed its sha256 check "
            f"{FETCH_ATTEMPTS} times"
        )

    async def _download(self, adapter_id: str) -> tuple[common_pb2.AdapterInfo, bytes]:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=SERVER_OPTIONS)
        stub = AdapterStoreStub(self._channel)
        request = adapter_store_pb2.FetchAdapterRequest(adapter_id=adapter_id)
        info: common_pb2.AdapterInfo | None = None
        parts: list[bytes] = []
        try:
            chunks = stub.FetchAdapter(
                request, timeout=self._timeout_s, metadata=request_id_metadata()
            )
            async for chunk in chunks:
                if info is None:
                    info = chunk.info
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise self._error_of(adapter_id, exc) from exc
        if info is None or not info.sha256:
            raise Unavailable(f"the store at {self.target} sent {adapter_id!r} without its info")
        return info, b"".join(parts)

    def _error_of(self, adapter_id: str, exc: grpc.aio.AioRpcError) -> ServiceError:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(details or f"unknown adapter {adapter_id!r}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(details)
        return Unavailable(
            f"cannot fetch adapter {adapter_id!r} from the store at {self.target}: "
            f"{code.name}: {details}"
        )
