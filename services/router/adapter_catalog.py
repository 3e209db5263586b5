"""What the router asks of the adapter store: whether an adapter (or a pinned version of it)
exists, cached a few seconds so that a stream of requests costs the store one call; and the
ListAdapters pass-through. Which version serves a request is the worker's business."""

from __future__ import annotations

import logging
import time

import grpc

from manylora.v1 import adapter_store_pb2, common_pb2
from manylora.v1.adapter_store_pb2_grpc import AdapterStoreStub
from services.common.adapter_ref import adapter_ref
from services.common.channels import ChannelSecurity, aio_channel
from services.common.errors import InvalidArgument, NotFound, ServiceError, Unavailable
from services.common.grpc_server import SERVER_OPTIONS
from services.common.logging import request_id_metadata
from services.common.single_flight import SingleFlight

logger = logging.getLogger(__name__)

# An adapter refused as unknown may be uploaded a moment later: forget refusals sooner.
NEGATIVE_TTL_S = 1.0
# Past this many remembered ids, expired ones are dropped (ids come from clients).
MAX_REMEMBERED = 10_000


class AdapterCatalog:
    def __init__(
        self,
        target: str,
        ttl_s: float,
        timeout_s: float = 2.0,
        security: ChannelSecurity | None = None,
    ):
        self.target = target
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        # (id, version; 0 = any) -> (expires at, exists)
        self._known: dict[tuple[str, int], tuple[float, bool]] = {}
        self._lookups: SingleFlight[bool] = SingleFlight()
        self._channel = aio_channel(target, security, SERVER_OPTIONS)
        self._stub = AdapterStoreStub(self._channel)

    async def check(self, adapter_id: str, version: int = 0) -> None:
        """Raise NotFound for an adapter (or version; 0 = any) the store does not have. When
        the store cannot be asked the request goes on: a worker may still hold the adapter."""
        ref = (adapter_id, version)
        cached = self._known.get(ref)
        if cached is not None and cached[0] > time.monotonic():
            exists = cached[1]
        else:
            exists = await self._lookups.run(ref, lambda: self._lookup(adapter_id, version))
        if not exists:
            name = adapter_ref(adapter_id, version)
            raise NotFound(f"unknown adapter {name!r}: not in the adapter store")

    async def _lookup(self, adapter_id: str, version: int) -> bool:
        request = adapter_store_pb2.GetAdapterInfoRequest(adapter_id=adapter_id, version=version)
        try:
            await self._stub.GetAdapterInfo(
                request, timeout=self._timeout_s, metadata=request_id_metadata()
            )
            exists, ttl = True, self._ttl_s
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                exists, ttl = False, min(self._ttl_s, NEGATIVE_TTL_S)
            elif exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"adapter_id: {exc.details()}") from exc
            else:
                logger.warning(
                    "cannot check adapter %r at the store %s (%s); letting the worker decide",
                    adapter_id,
                    self.target,
                    exc.code().name,
                )
                return True
        now = time.monotonic()
        if len(self._known) >= MAX_REMEMBERED:
            self._known = {k: v for k, v in self._known.items() if v[0] > now}
        self._known[(adapter_id, version)] = (now + ttl, exists)
        return exists

    async def list(
        self, request: common_pb2.ListAdaptersRequest
    ) -> common_pb2.ListAdaptersResponse:
        try:
            response: common_pb2.ListAdaptersResponse = await self._stub.ListAdapters(
                request, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _passed_on(exc, self.target) from exc
        return response

    async def close(self) -> None:
        await self._channel.close()


def _passed_on(exc: grpc.aio.AioRpcError, target: str) -> ServiceError:
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(exc.details() or "invalid request")
    return Unavailable(f"adapter store at {target}: {exc.code().name}: {exc.details()}")
