"""Structured logs with the request id on every line, in every service: text for people
(the default) or one JSON object per line for log pipelines (`--log-format json`).

Fields given as `extra={"fields": {...}}` (see `log_fields`) become `key=value` pairs at the
end of a text line and keys of the JSON object, e.g. the router's one summary per request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

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


LOG_FORMATS = ("text", "json")
FIELDS_ATTR = "fields"


def log_fields(logger: logging.Logger, level: int, message: str, fields: Mapping[str, Any]) -> None:
    """Log `message` with named fields (numbers, strings, booleans, None)."""
    logger.log(level, message, extra={FIELDS_ATTR: dict(fields)})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, FIELDS_ATTR, None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    """LOG_FORMAT, with a record's fields appended as key=value (strings quoted when they
    hold a space or a quote, so that a line splits back into its fields)."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        pairs = [f"{key}={_text_value(value)}" for key, value in _fields(record).items()]
        return " ".join([line, *pairs])


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if text == "" or not text.isprintable() or any(c in text for c in ' "=\\'):
        return json.dumps(text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message, the record's
    fields, and the traceback (as `exc_info`) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", request_id_var.get()),
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    log_format = log_format.lower()
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
