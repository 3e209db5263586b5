"""Adapters on disk, the source of truth. Synchronous: the store calls it via asyncio.to_thread.

Layout under the data folder:

    <adapter_id>/v<N>/weights.safetensors   canonical blob of version N
    <adapter_id>/v<N>/info.json             its AdapterInfo
    <adapter_id>/last_version               highest version ever given to this id
    .tmp/                                   uploads, writes and deletions in progress

An upload streams into a spool file under `.tmp/` (never into memory), removed once it has
been read for validation, refused or cancelled. A version folder is built under `.tmp/`,
fsync'd and renamed into place, so it appears whole or not at all; `.tmp/` is emptied at
start, which removes whatever a crash left there.
`last_version` outlives a delete so that a version number is never given twice: whoever
cached (id, version) can trust it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from services.common.ids import is_valid_adapter_id

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "weights.safetensors"
INFO_NAME = "info.json"
LAST_VERSION_NAME = "last_version"
TMP_NAME = ".tmp"
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


@dataclass
class AdapterVersions:
    """Versions of one id present on disk, and the highest ever given."""

    live: list[int] = field(default_factory=list)
    last: int = 0


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UploadSpool:
    """The weights of one upload on their way in, in a file under `.tmp/`.

    `discard` is synchronous and idempotent so that it can run in a `finally` of a cancelled
    task without awaiting."""

    def __init__(self, path: Path):
        self.path = path
        self.size = 0
        self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115 (closed in discard)

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} was discarded")
        self._file.write(chunk)
        self.size += len(chunk)

    def read_all(self) -> bytes:
        if self._file is None:
            raise ValueError(f"{self.path} was discarded")
        self._file.flush()
        return self.path.read_bytes()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


class DiskStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._tmp = self.root / TMP_NAME

    def version_dir(self, adapter_id: str, version: int) -> Path:
        return self.root / adapter_id / f"v{version}"

    def prepare(self) -> None:
        """Create the folders and remove what an interrupted write or delete left behind."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():
            logger.warning("removing leftover of an interrupted write: %s", leftover)
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:  # an upload's spool, or a version number being written
                leftover.unlink(missing_ok=True)

    def open_spool(self) -> UploadSpool:
        return UploadSpool(self._tmp / f"upload-{uuid.uuid4().hex}")

    def scan(self) -> dict[str, AdapterVersions]:
        """Every id folder with its versions (ids whose versions were all deleted included)."""
        found: dict[str, AdapterVersions] = {}
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if not is_valid_adapter_id(entry.name):
                logger.warning("ignoring %s: not a valid adapter id", entry)
                continue
            state = AdapterVersions(last=self._read_last_version(entry))
            for child in entry.iterdir():
                match = _VERSION_RE.match(child.name)
                if match and (child / INFO_NAME).is_file() and (child / WEIGHTS_NAME).is_file():
                    state.live.append(int(match[1]))
            state.live.sort()
            state.last = max([state.last, *state.live])
            found[entry.name] = state
        return found

    def write(self, adapter_id: str, version: int, info_json: bytes, blob: bytes) -> None:
        """Store one version whole; `FileExistsError` if it is already there."""
        target = self.version_dir(adapter_id, version)
        staging = self._tmp / f"write-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            _write_file(staging / WEIGHTS_NAME, blob)
            _write_file(staging / INFO_NAME, info_json)
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                raise FileExistsError(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(target.parent)
        self._write_last_version(target.parent, version)

    def read_blob(self, adapter_id: str, version: int) -> bytes:
        return (self.version_dir(adapter_id, version) / WEIGHTS_NAME).read_bytes()

    def read_info(self, adapter_id: str, version: int) -> bytes:
        return (self.version_dir(adapter_id, version) / INFO_NAME).read_bytes()

    def delete(self, adapter_id: str, versions: list[int]) -> None:
        """Remove the given versions, each at once (renamed away first, then erased)."""
        for version in versions:
            source = self.version_dir(adapter_id, version)
            doomed = self._tmp / f"delete-{uuid.uuid4().hex}"
            try:
                os.rename(source, doomed)
            except FileNotFoundError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)

    def _read_last_version(self, adapter_dir: Path) -> int:
        try:
            return int((adapter_dir / LAST_VERSION_NAME).read_text().strip())
        except (FileNotFoundError, ValueError):
            return 0

    def _write_last_version(self, adapter_dir: Path, version: int) -> None:
        if self._read_last_version(adapter_dir) >= version:
            return
        staging = self._tmp / f"last-{uuid.uuid4().hex}"
        _write_file(staging, str(version).encode())
        os.replace(staging, adapter_dir / LAST_VERSION_NAME)
