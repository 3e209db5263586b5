"""Structured logs with the request id on every line, in every service."""

from __future__ import annotations

import contextvars
import logging
import sys
import uuid
from collections.abc import Sequence

import grpc

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# gRPC metadata key that carries the request id on calls between services.
REQUEST_ID_KEY = "x-request-id"


def request_id_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for an outgoing call made on behalf of the current request (if any)."""
    rid = request_id_var.get()
    return () if rid == "-" else ((REQUEST_ID_KEY, rid),)


def bind_request_id(context: grpc.aio.ServicerContext) -> str:
    """Take the caller's request id from the call's metadata (or make one) for this task's logs."""
    metadata: Sequence[tuple[str, str | bytes]] = context.invocation_metadata() or ()
    rid = next((str(v) for k, v in metadata if k == REQUEST_ID_KEY), "") or uuid.uuid4().hex
    request_id_var.set(rid)
    return rid


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [rid=%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to each record: an explicit `extra=` wins over the context variable."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
