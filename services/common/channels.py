"""Client channels of every caller (clients, the CLI, router to worker and store, worker to
store): plaintext or TLS, and a bearer token added to each call's metadata when there is one.

The token goes in through a client interceptor rather than gRPC call credentials, because
gRPC sends call credentials only over TLS and tokens must also work on a plaintext network
that is trusted (one host, a private network); with TLS off, they travel in clear.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc

from services.common.auth import AUTHORIZATION_KEY
from services.common.tls import ClientTls
from services.common.tokens import SERVICE, SigningKeys
from services.common.tracing import client_interceptors

# Minted service tokens live this long and are renewed at half their life.
SERVICE_TOKEN_TTL_S = 3600.0


class StaticToken:
    """A token given by the operator (a file, an environment variable)."""

    def __init__(self, token: str):
        self._token = token.strip()
        if not self._token:
            raise ValueError("the token is empty")

    def __call__(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return "StaticToken(<hidden>)"


class MintedServiceToken:
    """A `service` token this process signs for itself with the deployment's key, renewed
    before it expires."""

    def __init__(self, keys: SigningKeys, subject: str, ttl_s: float = SERVICE_TOKEN_TTL_S):
        self._keys = keys
        self._subject = subject
        self._ttl_s = ttl_s
        self._token = ""
        self._renew_at = 0.0

    def __call__(self) -> str:
        now = time.time()
        if now >= self._renew_at:
            self._token = self._keys.mint(self._subject, [SERVICE], self._ttl_s, now=now)
            self._renew_at = now + self._ttl_s / 2
        return self._token

    def __repr__(self) -> str:
        return f"MintedServiceToken(subject={self._subject!r}, <hidden>)"


TokenSource = Callable[[], str]


def token_from_file(path: str) -> StaticToken:
    """Raises OSError when unreadable, ValueError when empty."""
    with open(path) as fh:
        return StaticToken(fh.read())


@dataclass(frozen=True)
class ChannelSecurity:
    """What a caller uses on its channels: TLS (None: plaintext) and a token (None: none)."""

    tls: ClientTls | None = None
    token: TokenSource | None = None

    def check(self) -> None:
        if self.tls is not None:
            self.tls.check()


PLAINTEXT = ChannelSecurity()


def aio_channel(
    target: str, security: ChannelSecurity | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    security = security or PLAINTEXT
    interceptors = _aio_interceptors(security.token) if security.token is not None else []
    # Only when a service of this process traces (services.common.tracing): else none.
    interceptors += client_interceptors(target)
    if security.tls is None:
        return grpc.aio.insecure_channel(
            target, options=list(options), interceptors=interceptors or None
        )
    return grpc.aio.secure_channel(
        target, security.tls.credentials(), options=list(options), interceptors=interceptors or None
    )


def sync_channel(
    target: str, security: ChannelSecurity | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    security = security or PLAINTEXT
    if security.tls is None:
        channel = grpc.insecure_channel(target, options=list(options))
    else:
        channel = grpc.secure_channel(target, security.tls.credentials(), options=list(options))
    if security.token is None:
        return channel
    return grpc.intercept_channel(channel, _SyncBearer(security.token))


def _with_token(metadata: Any, token: TokenSource) -> list[tuple[str, str]]:
    return [*(metadata or ()), (AUTHORIZATION_KEY, f"Bearer {token()}")]


class _AioBearer:
    def __init__(self, token: TokenSource):
        self._token = token

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*_with_token(details.metadata, self._token))
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the first call kind it implements, so each kind has
# its own class.
class _AioUnaryUnary(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _AioUnaryStream(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _AioStreamUnary(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self.details(details), requests)


class _AioStreamStream(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self.details(details), requests)


def _aio_interceptors(token: TokenSource) -> list[Any]:
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    return [kind(token) for kind in kinds]


class _SyncDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _SyncBearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: TokenSource):
        self._token = token

    def _details(self, details: Any) -> Any:
        return _SyncDetails(
            details.method,
            details.timeout,
            _with_token(details.metadata, self._token),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
