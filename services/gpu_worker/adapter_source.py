"""Where the worker gets adapters from: local PEFT folders now, the adapter store later.

The gRPC layer asks a source for an adapter before it hands a request to the engine, so the
engine thread never waits on disk or network.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

from services.common.base_model import BaseModelShape
from services.common.errors import NotFound
from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder

logger = logging.getLogger(__name__)


class AdapterSource(Protocol):
    """Gives canonical adapters (on the host) by id."""

    async def get(self, adapter_id: str) -> CanonicalAdapter:
        """The adapter, or `NotFound` when no such id exists."""
        ...

    def cached_ids(self) -> list[str]:
        """Ids held in host memory now (for stats and routing)."""
        ...


def parse_adapter_paths(specs: list[str]) -> dict[str, Path]:
    """`id=path` or bare `path` (id = folder name); a folder of PEFT folders adds each of them."""
    paths: dict[str, Path] = {}
    for spec in specs:
        adapter_id, sep, raw = spec.partition("=")
        path = Path(raw if sep else spec)
        if not sep and not (path / "adapter_config.json").is_file() and path.is_dir():
            for child in sorted(path.iterdir()):
                if (child / "adapter_config.json").is_file():
                    paths[child.name] = child
            continue
        paths[adapter_id if sep else path.name] = path
    return paths


class LocalFolderAdapterSource:
    """Adapters from local PEFT folders, validated and converted once, at start-up."""

    def __init__(self, paths: dict[str, Path], shape: BaseModelShape, max_rank: int):
        self._adapters = {
            adapter_id: load_peft_folder(path, shape, max_rank, adapter_id)
            for adapter_id, path in paths.items()
        }
        for adapter_id, adapter in self._adapters.items():
            logger.info(
                "loaded adapter %s (rank %d) from %s", adapter_id, adapter.rank, paths[adapter_id]
            )
        self.hits = 0
        self.misses = 0

    async def get(self, adapter_id: str) -> CanonicalAdapter:
        await asyncio.sleep(0)
        adapter = self._adapters.get(adapter_id)
        if adapter is None:
            self.misses += 1
            raise NotFound(f"unknown adapter {adapter_id!r}")
        self.hits += 1
        return adapter

    def cached_ids(self) -> list[str]:
        return sorted(self._adapters)
