"""Where the worker gets adapters from: local PEFT folders, or the adapter store.

The gRPC layer asks a source for an adapter before it hands a request to the engine, so the
engine thread never waits on disk or network. Every adapter a source gives carries its
identity (id, version, sha256 of its canonical bytes), which is what the GPU keys it by.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Protocol

import torch

from services.common.adapter_ref import adapter_ref
from services.common.base_model import BaseModelShape
from services.common.errors import NotFound
from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder

logger = logging.getLogger(__name__)


class AdapterSource(Protocol):
    """Gives canonical adapters (on the host) by id."""

    async def get(self, adapter_id: str, version: int = 0) -> CanonicalAdapter:
        """The adapter at `version` (0: the newest), or `NotFound` when there is no such id
        or version."""
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


def load_local_adapter(
    path: Path, shape: BaseModelShape, max_rank: int, adapter_id: str
) -> CanonicalAdapter:
    """A PEFT folder as version 1, with the sha256 of its canonical bytes as its digest."""
    adapter = load_peft_folder(path, shape, max_rank, adapter_id)
    adapter.version = LOCAL_VERSION
    adapter.sha256 = hashlib.sha256(adapter.to_bytes()).hexdigest()
    return adapter


# Local folders are read once, so each has one version.
LOCAL_VERSION = 1


class LocalFolderAdapterSource:
    """Adapters from local PEFT folders, validated and converted once, at start-up. A folder
    that cannot be served is skipped with one warning naming it and why; the rest serve."""

    def __init__(
        self,
        paths: dict[str, Path],
        shape: BaseModelShape,
        max_rank: int,
        dtype: torch.dtype | None = None,
    ):
        """`dtype`: what the adapters are kept in (the engine's); None keeps the files'."""
        self._adapters: dict[str, CanonicalAdapter] = {}
        for adapter_id, path in paths.items():
            try:
                adapter = load_local_adapter(path, shape, max_rank, adapter_id)
                if dtype is not None:
                    adapter = adapter.to("cpu", dtype)
            # Whatever is wrong with one folder (refused, unreadable, not safetensors) must not
            # stop the worker from serving the others.
            except Exception as exc:
                logger.warning("skipping adapter folder %s (id %s): %s", path, adapter_id, exc)
                continue
            self._adapters[adapter_id] = adapter
            logger.info("loaded adapter %s (rank %d) from %s", adapter_id, adapter.rank, path)
        self.hits = 0
        self.misses = 0

    async def get(self, adapter_id: str, version: int = 0) -> CanonicalAdapter:
        await asyncio.sleep(0)
        adapter = self._adapters.get(adapter_id)
        if adapter is None or version not in (0, adapter.version):
            self.misses += 1
            what = "adapter" if adapter is None else "adapter version"
            raise NotFound(f"unknown {what} {adapter_ref(adapter_id, version)!r}")
        self.hits += 1
        return adapter

    def cached_ids(self) -> list[str]:
        return sorted(self._adapters)
