"""Adapter weights from the worker's gRPC process to its engine process through a file in
shared memory, not through their pipe.

The engine thread reads the pipe itself, between steps (engine_child.py), and every running
request waits while it does. multiprocessing writes a message over 16 KB as two writes, its
size and then its body, and the gRPC process's sender thread must take that process's GIL
between them, which its event loop may hold for milliseconds while it parses an adapter
download: the engine thread then waits in the read for the body. On the device it spent
0.65 s in that read over one run that brought 50 adapters of 17 MB (BENCHMARKS.md, tenth
session). Through a file, the pipe carries only its path, and the engine thread reads a file
that is whole before its path is sent.

Where shared memory is missing or too small (Docker gives a container 64 MB by default), the
weights go through the pipe as before: slower for the engine, never lost.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from services.common.lora_format import CanonicalAdapter

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "manylora-adapter-"  # then the writing process's pid


class AdapterHandoff:
    """Writes handoff files named after this process, and removes what the engine process
    left behind (it removes each file it reads; one that dies may not have)."""

    def __init__(self, directory: Path | None = None):
        if directory is None:
            directory = SHM_DIR if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) else None
        self.directory = directory
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self._warned = False
        if directory is not None:
            _remove_orphans(directory)

    def write(self, adapter: CanonicalAdapter) -> str | None:
        """A file holding `adapter` (`CanonicalAdapter.to_file`), or None when it cannot be
        written (the caller sends the adapter's bytes through the pipe instead)."""
        if self.directory is None:
            return None
        path = None
        try:
            fd, path = tempfile.mkstemp(prefix=self.prefix, dir=self.directory)
            os.close(fd)
            adapter.to_file(path)
        except (OSError, SafetensorError) as exc:  # safetensors' own error for a full disk
            if path is not None:
                Path(path).unlink(missing_ok=True)
            if not self._warned:
                self._warned = True
                logger.warning(
                    "cannot hand adapters to the engine process through %s (%s); sending them "
                    "through the pipe, which stalls its steps (in Docker, raise shm_size)",
                    self.directory,
                    getattr(exc, "strerror", None) or exc,
                )
            return None
        return path

    def remove_leftovers(self) -> None:
        if self.directory is None:
            return
        for path in self.directory.glob(self.prefix + "*"):
            path.unlink(missing_ok=True)


def _remove_orphans(directory: Path) -> None:
    """Files of workers that are gone (killed before they could clean up): /dev/shm lives in
    memory, and nothing else would ever free them."""
    for path in directory.glob(PREFIX + "*"):
        pid = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def take(path: str) -> CanonicalAdapter:
    """The engine process's side: the adapter in the file, and the file gone."""
    try:
        return CanonicalAdapter.from_file(path)
    finally:
        os.unlink(path)
