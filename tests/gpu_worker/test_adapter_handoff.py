"""Adapter weights handed to the engine process through shared-memory files: a file that
cannot be written leaves nothing behind and sends the caller to the pipe, and what a dead
engine process never read is removed with its worker's prefix only."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from services.gpu_worker.serving import adapter_handoff
from services.gpu_worker.serving.adapter_handoff import AdapterHandoff


def test_a_file_is_read_once_and_removed(tmp_path: Path) -> None:
    handoff = AdapterHandoff(tmp_path)
    path = handoff.write(b"weights" * 1000)
    assert path is not None and Path(path).parent == tmp_path
    assert adapter_handoff.take(path) == b"weights" * 1000
    assert not list(tmp_path.iterdir())


def test_a_full_folder_leaves_no_file_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Writing into /dev/full fails as a full /dev/shm does (ENOSPC): the half-made file goes,
    and the caller is told to use the pipe."""
    made: list[str] = []
    mkstemp = tempfile.mkstemp

    def mkstemp_on_a_full_disk(prefix: str, dir: Path) -> tuple[int, str]:
        fd, path = mkstemp(prefix=prefix, dir=dir)
        os.close(fd)
        made.append(path)
        return os.open("/dev/full", os.O_WRONLY), path

    monkeypatch.setattr(adapter_handoff.tempfile, "mkstemp", mkstemp_on_a_full_disk)
    handoff = AdapterHandoff(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert handoff.write(b"x" * 10_000) is None
        assert handoff.write(b"x" * 10_000) is None
    assert len(made) == 2 and not list(tmp_path.iterdir())
    warnings = [r for r in caplog.records if "through the pipe" in r.getMessage()]
    assert len(warnings) == 1 and "shm_size" in warnings[0].getMessage()


def test_no_folder_means_the_pipe(tmp_path: Path) -> None:
    assert AdapterHandoff(tmp_path / "not-a-folder").write(b"x") is None  # mkstemp fails
    missing = tmp_path / "gone"
    assert AdapterHandoff(missing).write(b"x") is None
    assert not missing.exists()


def test_leftovers_of_this_worker_only_are_removed(tmp_path: Path) -> None:
    handoff = AdapterHandoff(tmp_path)
    unread = [handoff.write(b"a"), handoff.write(b"b")]
    other = tmp_path / "manylora-adapter-1-someone-else"
    other.write_bytes(b"c")
    handoff.remove_leftovers()
    assert all(p is not None and not Path(p).exists() for p in unread)
    assert other.exists()


def test_shared_memory_is_the_default_where_it_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter_handoff, "SHM_DIR", Path("/nonexistent-shm"))
    assert AdapterHandoff().directory is None


def test_files_of_workers_that_are_gone_are_removed_when_a_worker_starts(tmp_path: Path) -> None:
    """A worker killed outright leaves its unread files in memory; the next one on the host
    removes them, and never a living worker's."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = tmp_path / f"manylora-adapter-{gone.pid}-abc"
    living = tmp_path / f"manylora-adapter-{os.getppid()}-def"
    unrelated = tmp_path / "something-else"
    for path in (orphan, living, unrelated):
        path.write_bytes(b"x")
    AdapterHandoff(tmp_path)
    assert not orphan.exists() and living.exists() and unrelated.exists()
