"""Errors as OpenAI's API returns them: an HTTP status and `{"error": {message, type, param,
code}}`, whether the front refused the request itself or the router ended the call with a gRPC
status (one HTTP status per gRPC code, below)."""

from __future__ import annotations

from typing import Any

import grpc

from services.common.errors import status_details

# OpenAI's `type` of an error, by HTTP status; 5xx are the server's.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# The HTTP status of each gRPC code the router may end a call with; others are 500.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Seconds a client is told to wait after a 429 or 503 (the router's queue, or no worker).
RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request that ends with `status` and OpenAI's error body; `grpc_code` when the router
    ended the call."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        grpc_code: grpc.StatusCode | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.grpc_code = grpc_code

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "api_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(RETRY_AFTER_S)} if self.status in (429, 503) else {}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, "invalid_request")


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ApiError:
    """The router's status as the HTTP error a client of OpenAI's API expects."""
    code = exc.code()
    details = status_details(exc.details() or code.name)
    status = HTTP_STATUS.get(code, 500)
    name = "model_not_found" if code == grpc.StatusCode.NOT_FOUND else code.name.lower()
    return ApiError(status, details, "model" if status == 404 else None, name, code)
