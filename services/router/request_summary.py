"""One line per request in the router's log, and its per-adapter counters, when it ends.

The line (a `log_fields` record, `key=value` in text logs, keys in JSON logs) says: the
adapter and the version that served it, prompt and generated tokens, time to first token,
duration, and how it ended (OK or the gRPC status code; CANCELLED when the client left).
The request id is on the line as on every line of the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from manylora.v1 import common_pb2
from services.common.logging import log_fields
from services.common.metrics import StreamTracker

logger = logging.getLogger(__name__)

SUMMARY_MESSAGE = "request summary"
# Adds one request's outcome to the per-adapter counters: (adapter id, status, prompt tokens,
# generated tokens).
AdapterCounts = Callable[[str, str, int, int], None]


class RequestSummary:
    """Follows one Generate stream beside its StreamTracker, which it drives: feed it each
    response, say which request it is once known (`describe`), then `close` it exactly once."""

    def __init__(self, tracker: StreamTracker, count: AdapterCounts):
        self._tracker = tracker
        self._count = count
        self._start = time.monotonic()
        self._first_token_at: float | None = None
        self._request: common_pb2.GenerateRequest | None = None
        self._version = 0
        self._prompt_tokens: int | None = None
        self._generated = 0
        self._finish = ""
        self._status: str | None = None

    def describe(self, request: common_pb2.GenerateRequest) -> None:
        """The checked request, read again at the end: the servicer parses its `id@N` into
        the bare id and the version in place."""
        self._request = request

    def on_response(self, response: common_pb2.GenerateResponse) -> common_pb2.GenerateResponse:
        count = len(response.token_ids)
        if count:
            if self._first_token_at is None:
                self._first_token_at = time.monotonic()
            self._generated += count
        if response.adapter_version:
            self._version = response.adapter_version
        if response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self._prompt_tokens = response.usage.prompt_tokens
            self._finish = common_pb2.FinishReason.Name(response.finish_reason).lower()
            self._status = grpc.StatusCode.OK.name
        return self._tracker.on_response(response)

    def fail(self, code: grpc.StatusCode) -> None:
        if self._status is None:
            self._status = code.name
        self._tracker.fail(code)

    def close(self) -> None:
        self._tracker.close()
        status = self._status or grpc.StatusCode.CANCELLED.name
        end = time.monotonic()
        ttft = None if self._first_token_at is None else (self._first_token_at - self._start)
        adapter_id = self._request.adapter_id if self._request is not None else ""
        version = self._version or (self._request.adapter_version if self._request else 0)
        self._count(adapter_id, status, self._prompt_tokens or 0, self._generated)
        log_fields(
            logger,
            logging.INFO,
            SUMMARY_MESSAGE,
            {
                "adapter": adapter_id,
                "adapter_version": version,
                "status": status,
                "finish_reason": self._finish or None,
                "prompt_tokens": self._prompt_tokens,
                "generated_tokens": self._generated,
                "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
                "duration_ms": round((end - self._start) * 1000, 3),
            },
        )
