"""The asyncio client: `async for chunk in AsyncManyloraClient(...).generate(...)`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from manylora.v1 import common_pb2, router_pb2_grpc
from services.client.messages import (
    Chunk,
    Completion,
    CompletionBuilder,
    GenerateParams,
    ManyloraError,
    build_request,
    chunk_from_proto,
)
from services.common.channels import ChannelSecurity, StaticToken, TokenSource, aio_channel
from services.common.tls import ClientTls

if TYPE_CHECKING:
    from typing_extensions import Unpack


class AsyncManyloraClient:
    """A connection to a router; create it inside the event loop that uses it."""

    def __init__(
        self,
        target: str,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        *,
        token: str | TokenSource | None = None,
        tls: ClientTls | None = None,
    ):
        """`timeout`: default deadline in seconds of each call; None means no deadline.
        `token`: a bearer token (or a function returning the current one) sent on every call;
        `tls`: verify the router with TLS (and present a client certificate for mutual TLS)."""
        source = StaticToken(token) if isinstance(token, str) else token
        self._channel = aio_channel(target, ChannelSecurity(tls, source), options)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._timeout = timeout

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        **params: Unpack[GenerateParams],
    ) -> AsyncGenerator[Chunk, None]:
        """Stream a completion; `params` are build_request's (adapter, max_new_tokens, ...).
        Closing the generator early (or cancelling its task) cancels the request."""
        request = build_request(prompt, **params)
        call = self._stub.Generate(request, timeout=timeout or self._timeout)
        try:
            async for response in call:
                yield chunk_from_proto(response)
        except grpc.RpcError as exc:
            raise ManyloraError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    async def complete(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        **params: Unpack[GenerateParams],
    ) -> Completion:
        """The whole completion at once."""
        builder = CompletionBuilder()
        async for chunk in self.generate(prompt, timeout=timeout, **params):
            builder.add(chunk)
        return builder.build()

    async def list_adapters(self, page_size: int = 0) -> list[common_pb2.AdapterInfo]:
        """Every adapter the router's store holds (all pages)."""
        adapters: list[common_pb2.AdapterInfo] = []
        token = ""
        while True:
            request = common_pb2.ListAdaptersRequest(page_size=page_size, page_token=token)
            try:
                page = await self._stub.ListAdapters(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                raise ManyloraError.from_rpc_error(exc) from None
            adapters.extend(page.adapters)
            token = page.next_page_token
            if not token:
                return adapters

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncManyloraClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
