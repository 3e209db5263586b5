"""Errors that map one-to-one onto gRPC status codes, raised anywhere, translated at the edge."""

from __future__ import annotations

import grpc

# Trailing metadata a worker sets on a failed Generate call: whether the request failed
# (REQUEST_FAILURE: bad input, unknown adapter, the store unreachable for this adapter, its
# own non-finite logits) or the worker did (WORKER_FAILURE). A router counts only the latter
# against the worker's health, and passes the former on to its client as it is.
FAILURE_SCOPE_KEY = "x-manylora-failure-scope"
REQUEST_FAILURE = "request"
WORKER_FAILURE = "worker"
# Status details travel in a trailer, percent-encoded (3 bytes for each non-ASCII byte);
# gRPC's default metadata limit is 8 KiB. Bounded in UTF-8 bytes, they stay under 3 KiB.
MAX_STATUS_DETAILS_BYTES = 1000


def status_details(message: str) -> str:
    """`message` cut short enough to be sent as status details."""
    data = message.encode()
    if len(data) <= MAX_STATUS_DETAILS_BYTES:
        return message
    head = data[: MAX_STATUS_DETAILS_BYTES - 24].decode(errors="ignore")
    return f"{head}... ({len(message)} chars)"


class ServiceError(Exception):
    """An error a caller can act on; `code` is the gRPC status the caller sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # True when the worker that raised it is broken, not the request it was serving.
    worker_fault: bool = False

    def failure_scope(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata that tells a router whose failure this is."""
        return ((FAILURE_SCOPE_KEY, WORKER_FAILURE if self.worker_fault else REQUEST_FAILURE),)


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Internal(ServiceError):
    """Something went wrong with this request alone (e.g. its logits were not finite)."""

    code = grpc.StatusCode.INTERNAL


class WorkerFault(ServiceError):
    """The worker failed (e.g. a forward pass raised) and took its requests with it."""

    code = grpc.StatusCode.INTERNAL
    worker_fault = True


_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        FailedPrecondition,
        Internal,
    )
}


def error_for_status(code: grpc.StatusCode, message: str) -> ServiceError:
    """The error to raise for a status another service returned, passed on as it came: the
    class of that code where there is one, else a ServiceError carrying the code itself."""
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    error = ServiceError(message)
    error.code = code
    return error
