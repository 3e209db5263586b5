"""Notices the adapter store publishes on Redis pub/sub when an adapter changes, so that
workers drop what they resolved for it at once instead of when their TTL runs out.

A notice is JSON `{"event": "upload" | "delete", "adapter_id": ..., "version": N}` on channel
`<store's redis_key_prefix>events` (`manylora:store:events` by default). Pub/sub delivers
only to listeners connected at the time, so a notice is a shortcut, never the only way a
worker learns: it still re-checks with the store once a resolution is older than its TTL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

DEFAULT_CHANNEL = "manylora:store:events"
CHANNEL_SUFFIX = "events"
UPLOAD, DELETE = "upload", "delete"


@dataclass(frozen=True)
class AdapterEvent:
    event: str  # UPLOAD or DELETE
    adapter_id: str
    version: int  # the new version (upload) or the last one deleted (delete)

    def encode(self) -> str:
        return json.dumps(
            {"event": self.event, "adapter_id": self.adapter_id, "version": self.version}
        )

    @classmethod
    def decode(cls, data: bytes | str) -> AdapterEvent:
        """The notice in `data`; ValueError when it is not one."""
        try:
            fields = json.loads(data)
            event = cls(str(fields["event"]), str(fields["adapter_id"]), int(fields["version"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an adapter notice: {data!r:.200}") from exc
        if event.event not in (UPLOAD, DELETE):
            raise ValueError(f"unknown adapter notice {event.event!r}")
        return event
