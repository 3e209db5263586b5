"""The adapter store's logic, free of gRPC: validate, version, store on disk, cache in Redis."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict

import grpc
import torch

from manylora.v1 import common_pb2
from services.adapter_store.disk_store import AdapterVersions, DiskStore
from services.adapter_store.records import check_adapter_id, info_from_json, info_to_json, make_info
from services.adapter_store.redis_cache import RedisCache
from services.common.adapter_events import DELETE, UPLOAD, AdapterEvent
from services.common.base_model import BaseModelShape
from services.common.errors import InvalidArgument, NotFound, ServiceError
from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import AdapterValidationError, canonicalize
from services.common.single_flight import SingleFlight

logger = logging.getLogger(__name__)

AdapterInfo = common_pb2.AdapterInfo


class DataLoss(ServiceError):
    code = grpc.StatusCode.DATA_LOSS


class AdapterStore:
    """One store process owns its data folder: the version index lives in memory, read from
    disk at `open()`, and every write goes through this object."""

    def __init__(
        self,
        disk: DiskStore,
        shape: BaseModelShape,
        max_rank: int,
        cache: RedisCache | None,
        dtype: torch.dtype | None = None,
    ):
        """`dtype`: what uploads are converted to before they are stored (None: as uploaded).
        The stored bytes are the adapter's identity: its sha256 is theirs."""
        self.disk = disk
        self.cache = cache
        self._dtype = dtype
        self._shape = shape
        self._max_rank = max_rank
        self._versions: dict[str, AdapterVersions] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loads: SingleFlight[tuple[AdapterInfo, bytes]] = SingleFlight()

    async def open(self) -> None:
        await asyncio.to_thread(self.disk.prepare)
        self._versions = await asyncio.to_thread(self.disk.scan)
        live = sum(1 for state in self._versions.values() if state.live)
        logger.info("%d adapters on disk in %s", live, self.disk.root)
        if self.cache is not None:
            await self.cache.start()

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()

    async def upload(self, adapter_id: str, config_json: str, weights: bytes) -> AdapterInfo:
        check_adapter_id(adapter_id)
        adapter = await asyncio.to_thread(self._canonicalize, adapter_id, config_json, weights)
        blob = await asyncio.to_thread(adapter.to_bytes)
        async with self._locks[adapter_id]:
            state = self._versions.setdefault(adapter_id, AdapterVersions())
            info = make_info(adapter, blob, state.last + 1)
            info_json = info_to_json(info)
            await asyncio.to_thread(self.disk.write, adapter_id, info.version, info_json, blob)
            state.live.append(info.version)
            state.last = info.version
        if self.cache is not None:
            await self.cache.put(adapter_id, info.version, info_json, blob)
            await self.cache.publish(AdapterEvent(UPLOAD, adapter_id, info.version))
        logger.info(
            "stored %s v%d: rank %d, %s, %d bytes, sha256 %s",
            adapter_id,
            info.version,
            info.rank,
            ",".join(info.target_modules),
            info.size_bytes,
            info.sha256[:12],
        )
        return info

    async def info(self, adapter_id: str, version: int = 0) -> AdapterInfo:
        version = self._resolve(adapter_id, version)
        if self.cache is not None:
            cached = await self.cache.get_info(adapter_id, version)
            if cached is not None:
                return info_from_json(cached)
        try:
            data = await asyncio.to_thread(self.disk.read_info, adapter_id, version)
        except FileNotFoundError as exc:
            raise NotFound(f"adapter {adapter_id!r} version {version} is gone") from exc
        return info_from_json(data)

    async def fetch(self, adapter_id: str, version: int = 0) -> tuple[AdapterInfo, bytes]:
        """Info and canonical blob; concurrent fetches of one version share one load."""
        version = self._resolve(adapter_id, version)
        return await self._loads.run((adapter_id, version), lambda: self._load(adapter_id, version))

    async def list_page(self, page_size: int, page_token: str) -> tuple[list[AdapterInfo], str]:
        """Newest info of each id after `page_token`, by id; and the next page's token."""
        ids = sorted(i for i, state in self._versions.items() if state.live and i > page_token)
        page = ids[:page_size]
        infos = await asyncio.gather(*(self._info_or_none(i) for i in page))
        next_token = page[-1] if len(ids) > page_size else ""
        return [info for info in infos if info is not None], next_token

    async def delete(self, adapter_id: str) -> int:
        """Remove every version from disk and Redis; how many there were."""
        async with self._locks[adapter_id]:
            self._resolve(adapter_id, 0)
            state = self._versions[adapter_id]
            doomed, state.live = state.live, []
            await asyncio.to_thread(self.disk.delete, adapter_id, doomed)
        if self.cache is not None:
            await self.cache.delete(adapter_id, doomed)
            await self.cache.publish(AdapterEvent(DELETE, adapter_id, doomed[-1]))
        logger.info("deleted %s (versions %s)", adapter_id, doomed)
        return len(doomed)

    def _resolve(self, adapter_id: str, version: int) -> int:
        check_adapter_id(adapter_id)
        state = self._versions.get(adapter_id)
        if state is None or not state.live:
            raise NotFound(f"adapter {adapter_id!r} not found")
        if version == 0:
            return state.live[-1]
        if version not in state.live:
            raise NotFound(
                f"adapter {adapter_id!r} has no version {version} (versions: {state.live})"
            )
        return version

    def _canonicalize(self, adapter_id: str, config_json: str, weights: bytes) -> CanonicalAdapter:
        try:
            adapter = canonicalize(adapter_id, config_json, weights, self._shape, self._max_rank)
        except AdapterValidationError as exc:
            raise InvalidArgument(str(exc)) from exc
        return adapter if self._dtype is None else adapter.to("cpu", self._dtype)

    async def _load(self, adapter_id: str, version: int) -> tuple[AdapterInfo, bytes]:
        if self.cache is not None:
            cached = await self.cache.get_entry(adapter_id, version)
            if cached is not None:
                return info_from_json(cached[0]), cached[1]
        info_json, blob = await asyncio.to_thread(self._read_disk, adapter_id, version)
        if self.cache is not None:
            await self.cache.put(adapter_id, version, info_json, blob)
        return info_from_json(info_json), blob

    def _read_disk(self, adapter_id: str, version: int) -> tuple[bytes, bytes]:
        try:
            info_json = self.disk.read_info(adapter_id, version)
            blob = self.disk.read_blob(adapter_id, version)
        except FileNotFoundError as exc:
            raise NotFound(f"adapter {adapter_id!r} version {version} is gone") from exc
        # Checked here so that a file damaged on disk never reaches Redis or a worker.
        if hashlib.sha256(blob).hexdigest() != info_from_json(info_json).sha256:
            logger.error("stored blob of %s v%d does not match its sha256", adapter_id, version)
            raise DataLoss(f"stored copy of adapter {adapter_id!r} v{version} is damaged")
        return info_json, blob

    async def _info_or_none(self, adapter_id: str) -> AdapterInfo | None:
        try:
            return await self.info(adapter_id)
        except NotFound:  # deleted while the page was being built
            return None
