"""The worker registration record: what a GPU worker's heartbeat writes into Redis and what a
router reads back to find it.

One key per worker, `{prefix}{address}`, holding JSON `{"address": ..., "stats": ...}` where
stats is the worker's `GetStatsResponse` in protobuf's JSON mapping. The key lives for the
heartbeat's TTL, so a worker that dies disappears on its own. Writer:
services/gpu_worker/serving/heartbeat.py; reader: services/router/registry.py.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from manylora.v1 import gpu_worker_pb2

REGISTRY_PREFIX = "manylora:workers:"


def encode_record(address: str, stats: gpu_worker_pb2.GetStatsResponse) -> str:
    return json.dumps({"address": address, "stats": json_format.MessageToDict(stats)})


def decode_record(text: str | bytes) -> tuple[str, gpu_worker_pb2.GetStatsResponse]:
    """(address, stats) of one registry entry; ValueError when it is not one."""
    try:
        data: Any = json.loads(text)
        stats = json_format.ParseDict(data.get("stats", {}), gpu_worker_pb2.GetStatsResponse())
        address = data["address"]
    except (json.JSONDecodeError, json_format.ParseError, AttributeError, KeyError) as exc:
        raise ValueError(f"not a worker registration: {exc}") from exc
    if not isinstance(address, str) or not address:
        raise ValueError("worker registration without an address")
    return address, stats
