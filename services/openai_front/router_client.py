"""The front's one connection to the router: Generate streams and the adapter list, with gRPC
errors turned into OpenAI's (errors.from_rpc_error). A stream left early (the HTTP client went
away, its task was cancelled) cancels its call, and the router cancels the worker's request.

The HTTP client's own `Authorization` header travels to the router as the call's
`authorization` metadata: the front holds no token of its own, so a router that checks tokens
(README, "Security and operations") sees, and scopes, each client as if it called directly."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc

from manylora.v1 import common_pb2, router_pb2_grpc
from services.common.auth import AUTHORIZATION_KEY
from services.common.channels import ChannelSecurity, aio_channel
from services.common.grpc_server import SERVER_OPTIONS
from services.common.logging import REQUEST_ID_KEY
from services.common.tls import ClientTls
from services.openai_front.errors import ApiError, from_rpc_error

# Far beyond any adapter count served; bounds a store that keeps returning pages.
MAX_LISTED_PAGES = 1000
LIST_TIMEOUT_S = 10.0


class RouterClient:
    def __init__(self, target: str, tls: ClientTls | None = None):
        self.target = target
        self._channel = aio_channel(target, ChannelSecurity(tls, None), SERVER_OPTIONS)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    async def generate(
        self, request: common_pb2.GenerateRequest, timeout_s: float, authorization: str = ""
    ) -> AsyncGenerator[common_pb2.GenerateResponse, None]:
        metadata = ((REQUEST_ID_KEY, request.request_id), *_auth(authorization))
        call = self._stub.Generate(request, timeout=timeout_s, metadata=metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    async def list_adapters(self, authorization: str = "") -> list[common_pb2.AdapterInfo] | None:
        """Every adapter of the router's store (the newest version of each); None when the
        router has no store (FAILED_PRECONDITION)."""
        adapters: list[common_pb2.AdapterInfo] = []
        token = ""
        for _ in range(MAX_LISTED_PAGES):
            request = common_pb2.ListAdaptersRequest(page_token=token)
            try:
                page = await self._stub.ListAdapters(
                    request, timeout=LIST_TIMEOUT_S, metadata=_auth(authorization)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return None
                raise from_rpc_error(exc) from None
            adapters.extend(page.adapters)
            token = page.next_page_token
            if not token:
                return adapters
        raise ApiError(500, f"the adapter list did not end after {MAX_LISTED_PAGES} pages")

    async def close(self) -> None:
        await self._channel.close()


def _auth(authorization: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION_KEY, authorization),) if authorization else ()
