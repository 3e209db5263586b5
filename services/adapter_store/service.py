"""The gRPC face of the store: stream handling and the mapping of errors onto status codes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2
from services.adapter_store.records import check_adapter_id
from services.adapter_store.store import AdapterStore
from services.common.errors import InvalidArgument, ServiceError
from services.common.logging import bind_request_id
from services.common.peft_adapter import WEIGHTS_FILE

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


async def _abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> NoReturn:
    await context.abort(exc.code, str(exc))
    raise AssertionError("context.abort returned")  # it raises; this line tells the type checker


async def receive_upload(
    requests: AsyncIterator[adapter_store_pb2.UploadAdapterRequest], max_bytes: int
) -> tuple[adapter_store_pb2.UploadHeader, bytes]:
    """The header and the whole weights file of an upload stream, checked for size."""
    header: adapter_store_pb2.UploadHeader | None = None
    weights = bytearray()
    async for message in requests:
        kind = message.WhichOneof("payload")
        if header is None:
            if kind != "header":
                raise InvalidArgument("header: the first message must carry the upload header")
            header = message.header
            # Refuse early, before the client sends what may be hundreds of megabytes.
            check_adapter_id(header.adapter_id)
            if header.total_size > max_bytes:
                raise InvalidArgument(
                    f"total_size: {header.total_size} bytes is over the limit of {max_bytes}"
                )
        elif kind == "chunk":
            weights += message.chunk
            if len(weights) > max_bytes:
                raise InvalidArgument(f"{WEIGHTS_FILE}: over the limit of {max_bytes} bytes")
        else:
            raise InvalidArgument("header: sent twice; only the first message carries it")
    if header is None:
        raise InvalidArgument("header: the upload stream was empty")
    if header.total_size and header.total_size != len(weights):
        raise InvalidArgument(
            f"total_size: the header says {header.total_size} bytes, {len(weights)} arrived"
        )
    return header, bytes(weights)


class AdapterStoreService(adapter_store_pb2_grpc.AdapterStoreServicer):
    def __init__(self, store: AdapterStore, chunk_bytes: int, max_upload_bytes: int):
        self._store = store
        self._chunk_bytes = chunk_bytes
        self._max_upload_bytes = max_upload_bytes

    async def UploadAdapter(
        self,
        request_iterator: AsyncIterator[adapter_store_pb2.UploadAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> common_pb2.AdapterInfo:
        bind_request_id(context)
        try:
            header, weights = await receive_upload(request_iterator, self._max_upload_bytes)
            return await self._store.upload(header.adapter_id, header.adapter_config_json, weights)
        except ServiceError as exc:
            logger.info("upload refused: %s", exc)
            await _abort(context, exc)

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
