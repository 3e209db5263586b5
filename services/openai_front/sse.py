"""Server-sent events as the front writes them (`data: <json>` events, a stream ending with
`data: [DONE]`), and the reader of that format for Python callers without the `openai`
package (the demo, the benchmark)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

DATA = b"data: "
DONE = DATA + b"[DONE]\n\n"
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}


def sse_event(payload: dict[str, Any]) -> bytes:
    return DATA + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def read_sse_events(lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Each event's JSON payload, from a stream read line by line, until `[DONE]`."""
    async for raw in lines:
        line = raw.strip()
        if not line.startswith(DATA):
            continue
        if line == DONE.strip():
            return
        yield json.loads(line[len(DATA) :])
