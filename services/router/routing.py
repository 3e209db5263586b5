"""Which worker gets a request: adapter affinity first, under a load bound (see README.md).

Pure functions over snapshots, so that the policy is tested without servers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A healthy worker as the policy sees it."""

    address: str
    load: int  # requests running or waiting there
    on_gpu: frozenset[str] = frozenset()  # adapters resident in its memory pool
    in_host: frozenset[str] = frozenset()  # adapters in its host-memory cache


@dataclass(frozen=True)
class Choice:
    address: str
    # Where the chosen worker holds the adapter: "gpu", "host", or "none" (it must fetch it).
    affinity: str


def rendezvous_score(key: str, address: str) -> int:
    """Highest-random-weight hashing: every router ranks workers the same way for a key."""
    digest = hashlib.blake2b(f"{key}\0{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def load_bound(total_load: int, workers: int, factor: float, floor: int = 1) -> int:
    """Most requests one worker may hold, counting the one being placed: `factor` times the
    average (consistent hashing with bounded loads), but never under `floor`."""
    return max(floor, 1, math.ceil(factor * (total_load + 1) / workers))


def choose(
    adapter_id: str,
    request_id: str,
    candidates: Sequence[Candidate],
    factor: float,
    floor: int = 1,
) -> Choice | None:
    """The worker for one request, or None when there is no candidate.

    With an adapter: the first worker in the adapter's rendezvous order that holds it on the
    GPU, then in host memory, then any, whose load is under the bound. The base model has no
    affinity: the least loaded, ties broken by the request's own rendezvous order.
    """
    if not candidates:
        return None
    bound = load_bound(sum(c.load for c in candidates), len(candidates), factor, floor)
    key = adapter_id or request_id
    ranked = sorted(candidates, key=lambda c: rendezvous_score(key, c.address), reverse=True)
    if adapter_id:
        tiers = (
            ("gpu", [c for c in ranked if adapter_id in c.on_gpu]),
            ("host", [c for c in ranked if adapter_id in c.in_host]),
            ("none", ranked),
        )
        for affinity, tier in tiers:
            for c in tier:
                if c.load < bound:
                    return Choice(c.address, affinity)
    # Reached for the base model, or when stale loads put every worker over the bound.
    best = min(ranked, key=lambda c: c.load)  # min keeps the first of equals: rendezvous order
    return Choice(best.address, _affinity(adapter_id, best))


def _affinity(adapter_id: str, c: Candidate) -> str:
    if adapter_id and adapter_id in c.on_gpu:
        return "gpu"
    if adapter_id and adapter_id in c.in_host:
        return "host"
    return "none"
