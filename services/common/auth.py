"""Bearer-token authentication of every RPC, one `grpc.aio` server interceptor for all services.

A call carries `authorization: Bearer <token>` in its metadata (services.common.tokens). The
interceptor checks it before the servicer sees the call: no token, or a malformed, forged or
expired one, is UNAUTHENTICATED; a good token without a scope the method accepts is
PERMISSION_DENIED. Either way the servicer never runs (an upload refused reads no byte of it).

Which scopes each method accepts is `METHOD_SCOPES`, one table for the whole contract:

| method | scopes accepted |
| --- | --- |
| Router Generate, ListAdapters | generate |
| AdapterStore UploadAdapter, DeleteAdapter | adapters:write |
| AdapterStore GetAdapterInfo, ListAdapters | generate, adapters:write, service |
| AdapterStore FetchAdapter (the weights) | adapters:write, service |
| GpuWorker Generate, GetStats (router to worker) | service |
| grpc.health.v1.Health | none: open, for probes |
| gRPC server reflection | any valid token |

A method missing from the table is refused to every token (fail closed), so an RPC added to
the protos without a line here cannot be served unauthenticated by mistake.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import FileDescriptor

from manylora.v1 import adapter_store_pb2, gpu_worker_pb2, router_pb2
from services.common.rpc_names import split_method
from services.common.tokens import ADAPTERS_WRITE, GENERATE, SERVICE, SigningKeys, TokenError

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
OPEN_SERVICES = ("grpc.health.v1.Health",)
# Any valid token: reflection describes the API and nothing else.
ANY_TOKEN_SERVICES = ("grpc.reflection.v1alpha.ServerReflection",)


def method_path(file: FileDescriptor, service: str, method: str) -> str:
    """The path gRPC puts on the wire for a method, e.g. /manylora.v1.Router/Generate."""
    full = file.services_by_name[service].full_name
    file.services_by_name[service].methods_by_name[method]  # KeyError for a typo here
    return f"/{full}/{method}"


def _scopes(*scopes: str) -> frozenset[str]:
    return frozenset(scopes)


METHOD_SCOPES: dict[str, frozenset[str]] = {
    method_path(router_pb2.DESCRIPTOR, "Router", "Generate"): _scopes(GENERATE),
    method_path(router_pb2.DESCRIPTOR, "Router", "ListAdapters"): _scopes(GENERATE),
    **{
        method_path(adapter_store_pb2.DESCRIPTOR, "AdapterStore", name): scopes
        for name, scopes in {
            "UploadAdapter": _scopes(ADAPTERS_WRITE),
            "DeleteAdapter": _scopes(ADAPTERS_WRITE),
            "GetAdapterInfo": _scopes(GENERATE, ADAPTERS_WRITE, SERVICE),
            "ListAdapters": _scopes(GENERATE, ADAPTERS_WRITE, SERVICE),
            "FetchAdapter": _scopes(ADAPTERS_WRITE, SERVICE),
        }.items()
    },
    method_path(gpu_worker_pb2.DESCRIPTOR, "GpuWorker", "Generate"): _scopes(SERVICE),
    method_path(gpu_worker_pb2.DESCRIPTOR, "GpuWorker", "GetStats"): _scopes(SERVICE),
}


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of the call's one `authorization: Bearer` header; `Refusal` otherwise."""
    values = [v for k, v in metadata or () if k == AUTHORIZATION_KEY]
    if not values:
        raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "no authorization: Bearer token sent")
    if len(values) > 1:
        raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "more than one authorization header")
    value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "authorization is not 'Bearer <token>'")
    return token.strip()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose token does not grant what their method needs."""

    def __init__(
        self,
        keys: SigningKeys,
        method_scopes: dict[str, frozenset[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._keys = keys
        self._method_scopes = METHOD_SCOPES if method_scopes is None else method_scopes
        self._clock = clock

    def __repr__(self) -> str:
        return f"AuthInterceptor({self._keys!r})"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or split_method(method)[0] in OPEN_SERVICES:
            return handler
        try:
            self.check(method, handler_call_details.invocation_metadata)
        except Refusal as refusal:
            logger.info("refused %s: %s: %s", method, refusal.code.name, refusal)
            return refusing_handler(handler, refusal.code, str(refusal))
        return handler

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        """Nothing when the call may go on; `Refusal` saying why not (never quoting the token)."""
        try:
            claims = self._keys.verify(bearer_token(metadata), now=self._clock())
        except TokenError as exc:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        if split_method(method)[0] in ANY_TOKEN_SERVICES:
            return
        needed = self._method_scopes.get(method, frozenset())
        if not needed & claims.scopes:
            wanted = " or ".join(sorted(needed)) or "a method known to this server"
            has = ",".join(sorted(claims.scopes)) or "none"
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{claims.subject!r} may not call {method}: needs scope {wanted}, has {has}",
            )


def refusing_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends every call with `code`, without
    reading its requests (each kind has its own handler signature, streaming included)."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)
        yield  # never reached: abort raises; the yield makes this a streaming handler

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **serializers)
    return grpc.unary_unary_rpc_method_handler(unary, **serializers)
