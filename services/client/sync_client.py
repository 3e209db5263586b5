"""The blocking client: `ManyloraClient("host:port").generate(...)` yields chunks as they come."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
from services.common.channels import ChannelSecurity, StaticToken, TokenSource, sync_channel
from services.common.tls import ClientTls

if TYPE_CHECKING:
    from typing_extensions import Unpack


class ManyloraClient:
    """A connection to a router (or anything serving manylora.v1.Router)."""

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
        self._channel = sync_channel(target, ChannelSecurity(tls, source), options)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._timeout = timeout

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        **params: Unpack[GenerateParams],
    ) -> Iterator[Chunk]:
        """Stream a completion; `params` are build_request's (adapter, max_new_tokens, ...).
        Leaving the loop early cancels the request on the server."""
        request = build_request(prompt, **params)
        call = self._stub.Generate(request, timeout=timeout or self._timeout)
        try:
            for response in call:
                yield chunk_from_proto(response)
        except grpc.RpcError as exc:
            raise ManyloraError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    def complete(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        **params: Unpack[GenerateParams],
    ) -> Completion:
        """The whole completion at once."""
        builder = CompletionBuilder()
        for chunk in self.generate(prompt, timeout=timeout, **params):
            builder.add(chunk)
        return builder.build()

    def list_adapters(self, page_size: int = 0) -> list[common_pb2.AdapterInfo]:
        """Every adapter the router's store holds (all pages)."""
        adapters: list[common_pb2.AdapterInfo] = []
        token = ""
        while True:
            request = common_pb2.ListAdaptersRequest(page_size=page_size, page_token=token)
            try:
                page = self._stub.ListAdapters(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                raise ManyloraError.from_rpc_error(exc) from None
            adapters.extend(page.adapters)
            token = page.next_page_token
            if not token:
                return adapters

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ManyloraClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
