"""The gRPC face of the store: stream handling and the mapping of errors onto status codes."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2
from services.adapter_store.disk_store import UploadSpool
from services.adapter_store.records import check_adapter_id
from services.adapter_store.store import AdapterStore
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
)
from services.common.logging import bind_request_id
from services.common.peft_adapter import WEIGHTS_FILE
from services.common.peft_config import MAX_CONFIG_BYTES

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


async def _abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> NoReturn:
    await context.abort(exc.code, str(exc))
    raise AssertionError("context.abort returned")  # it raises; this line tells the type checker


# Checked at the header, before any weights arrive; the same limit validation applies.
MAX_CONFIG_JSON_BYTES = MAX_CONFIG_BYTES


def _clear_frames(exc: BaseException) -> None:
    """Drop the locals of the frames a refusal passed through (the weights among them), so
    that whoever keeps the exception a while keeps no upload alive with it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


class UploadBudget:
    """Bytes of uploads in flight across all clients, bounded; a stream that does not fit is
    refused at once (RESOURCE_EXHAUSTED, retry later) rather than queued, so that nothing
    waits on a slow client. Taken as a header announces its size (or as chunks arrive when it
    does not) and given back when the upload ends, validation included, since validation
    holds the weights in memory."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    def take(self, nbytes: int) -> None:
        if self.in_use + nbytes > self.limit:
            raise ResourceExhausted(
                f"uploads in flight: {self.in_use} of {self.limit} bytes taken "
                f"(--max-upload-bytes-in-flight); this upload needs {nbytes} more; retry later"
            )
        self.in_use += nbytes

    def give_back(self, nbytes: int) -> None:
        self.in_use -= nbytes

    def hold(self) -> BudgetHold:
        return BudgetHold(self)


class BudgetHold:
    """What one upload has taken from the budget, given back at once by `release`."""

    def __init__(self, budget: UploadBudget):
        self._budget = budget
        self.nbytes = 0

    def take(self, nbytes: int) -> None:
        self._budget.take(nbytes)
        self.nbytes += nbytes

    def release(self) -> None:
        self._budget.give_back(self.nbytes)
        self.nbytes = 0


class UploadLimits:
    def __init__(self, max_bytes: int, budget: UploadBudget, idle_timeout_s: float):
        self.max_bytes = max_bytes
        self.budget = budget
        self.idle_timeout_s = idle_timeout_s


def check_header(header: adapter_store_pb2.UploadHeader, max_bytes: int) -> None:
    """Refuse early, before the client sends what may be hundreds of megabytes."""
    check_adapter_id(header.adapter_id)
    if header.total_size > max_bytes:
        raise InvalidArgument(
            f"total_size: {header.total_size} bytes is over the limit of {max_bytes} "
            "(--max-upload-bytes)"
        )
    config_bytes = len(header.adapter_config_json.encode())
    if config_bytes > MAX_CONFIG_JSON_BYTES:
        raise InvalidArgument(
            f"adapter_config_json: {config_bytes} bytes is over the limit of "
            f"{MAX_CONFIG_JSON_BYTES}"
        )


async def _next_message(
    messages: AsyncIterator[adapter_store_pb2.UploadAdapterRequest], idle_timeout_s: float
) -> adapter_store_pb2.UploadAdapterRequest | None:
    """The next message, None at the end; a client silent for too long loses its upload (and
    the budget it holds)."""
    try:
        async with asyncio.timeout(idle_timeout_s):
            return await anext(messages)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise DeadlineExceeded(
            f"upload: no message for {idle_timeout_s:g} s (--upload-idle-timeout-s); dropped"
        ) from None


async def receive_upload(
    requests: AsyncIterator[adapter_store_pb2.UploadAdapterRequest],
    open_spool: Callable[[], UploadSpool],
    limits: UploadLimits,
    hold: BudgetHold,
) -> tuple[adapter_store_pb2.UploadHeader, UploadSpool]:
    """The header of an upload stream and its weights, written to a spool file as they arrive
    (the caller discards it). Budget is taken into `hold`, which the caller releases."""
    messages = aiter(requests)
    first = await _next_message(messages, limits.idle_timeout_s)
    if first is None:
        raise InvalidArgument("header: the upload stream was empty")
    if first.WhichOneof("payload") != "header":
        raise InvalidArgument("header: the first message must carry the upload header")
    header = first.header
    check_header(header, limits.max_bytes)
    # A declared size is taken whole at once: a stream that cannot finish is refused before
    # it sends anything. Without one, the budget is taken chunk by chunk.
    declared = header.total_size
    if declared:
        hold.take(declared)
    spool = open_spool()
    try:
        while (message := await _next_message(messages, limits.idle_timeout_s)) is not None:
            if message.WhichOneof("payload") != "chunk":
                raise InvalidArgument("header: sent twice; only the first message carries it")
            size = spool.size + len(message.chunk)
            if declared and size > declared:
                raise InvalidArgument(f"total_size: the header says {declared} bytes, more arrived")
            if size > limits.max_bytes:
                raise InvalidArgument(
                    f"{WEIGHTS_FILE}: over the limit of {limits.max_bytes} bytes "
                    "(--max-upload-bytes)"
                )
            if not declared:
                hold.take(len(message.chunk))
            await asyncio.to_thread(spool.write, message.chunk)
        if declared and spool.size != declared:
            raise InvalidArgument(
                f"total_size: the header says {declared} bytes, {spool.size} arrived"
            )
    except BaseException:
        spool.discard()
        raise
    return header, spool


class AdapterStoreService(adapter_store_pb2_grpc.AdapterStoreServicer):
    def __init__(self, store: AdapterStore, chunk_bytes: int, limits: UploadLimits):
        self._store = store
        self._chunk_bytes = chunk_bytes
        self._limits = limits

    async def UploadAdapter(
        self,
        request_iterator: AsyncIterator[adapter_store_pb2.UploadAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> common_pb2.AdapterInfo:
        bind_request_id(context)
        hold = self._limits.budget.hold()
        try:
            header, spool = await receive_upload(
                request_iterator, self._store.disk.open_spool, self._limits, hold
            )
            return await self._validate_and_store(header, spool)
        except ServiceError as exc:
            logger.info("upload refused: %s", exc)
            _clear_frames(exc)
            await _abort(context, exc)
        finally:
            hold.release()

    async def _validate_and_store(
        self, header: adapter_store_pb2.UploadHeader, spool: UploadSpool
    ) -> common_pb2.AdapterInfo:
        try:
            # Validation needs the whole file in memory: bounded by --max-upload-bytes, and
            # counted in the budget until the upload ends.
            weights = await asyncio.to_thread(spool.read_all)
        finally:
            spool.discard()
        return await self._store.upload(header.adapter_id, header.adapter_config_json, weights)

    async def GetAdapterInfo(
        self, request: adapter_store_pb2.GetAdapterInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.AdapterInfo:
        bind_request_id(context)
        try:
            return await self._store.info(request.adapter_id, request.version)
        except ServiceError as exc:
            await _abort(context, exc)

    async def FetchAdapter(
        self, request: adapter_store_pb2.FetchAdapterRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[adapter_store_pb2.AdapterChunk]:
        bind_request_id(context)
        try:
            info, blob = await self._store.fetch(request.adapter_id, request.version)
        except ServiceError as exc:
            await _abort(context, exc)
        logger.info("fetch %s v%d: %d bytes", info.adapter_id, info.version, len(blob))
        view = memoryview(blob)
        for offset in range(0, max(len(blob), 1), self._chunk_bytes):
            chunk = adapter_store_pb2.AdapterChunk(
                data=bytes(view[offset : offset + self._chunk_bytes])
            )
            if offset == 0:
                chunk.info.CopyFrom(info)
            yield chunk

    async def ListAdapters(
        self, request: common_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListAdaptersResponse:
        bind_request_id(context)
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        infos, next_token = await self._store.list_page(page_size, request.page_token)
        return common_pb2.ListAdaptersResponse(adapters=infos, next_page_token=next_token)

    async def DeleteAdapter(
        self, request: adapter_store_pb2.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapter_store_pb2.DeleteAdapterResponse:
        bind_request_id(context)
        try:
            deleted = await self._store.delete(request.adapter_id)
        except ServiceError as exc:
            await _abort(context, exc)
        return adapter_store_pb2.DeleteAdapterResponse(deleted_versions=deleted)
