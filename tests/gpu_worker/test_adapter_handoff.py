"""Adapter weights handed to the engine process through shared-memory files: a file that
cannot be written leaves nothing behind and sends the caller to the pipe, and what a dead
engine process never read is removed with its worker's prefix only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.serving import adapter_handoff
from services.gpu_worker.serving.adapter_handoff import AdapterHandoff


def _adapter(features: int = 64) -> CanonicalAdapter:
    adapter = CanonicalAdapter(adapter_id="a", rank=4, alpha=8.0, scaling=2.0, base_model="m")
    adapter.lora_a["q_proj"] = torch.randn(2, 4, features).to(torch.bfloat16)
    adapter.lora_b["q_proj"] = torch.randn(2, features, 4).to(torch.bfloat16)
    return adapter


def test_a_file_is_read_once_and_removed(tmp_path: Path) -> None:
    handoff = AdapterHandoff(tmp_path)
    adapter = _adapter()
    path = handoff.write(adapter)
    assert path is not None and Path(path).parent == tmp_path
    got = adapter_handoff.take(path)
    assert not list(tmp_path.iterdir())
    assert (got.adapter_id, got.rank, got.alpha, got.scaling, got.base_model) == ("a", 4, 8, 2, "m")
    assert torch.equal(got.lora_a["q_proj"], adapter.lora_a["q_proj"])
    assert torch.equal(got.lora_b["q_proj"], adapter.lora_b["q_proj"])


def test_what_is_taken_holds_no_mapping_of_the_file(tmp_path: Path) -> None:
    """safetensors maps a file it opens; a tensor left on that mapping would keep the removed
    file's shared memory taken for as long as the engine keeps the adapter."""
    path = AdapterHandoff(tmp_path).write(_adapter())
    assert path is not None
    got = adapter_handoff.take(path)
    with open("/proc/self/maps") as maps:
        assert path not in maps.read()
    assert got.lora_a["q_proj"].shape == (2, 4, 64)


# Run in a process of its own: a file-size limit applies to every file the process writes,
# pytest's output too when it goes to a file.
_FULL_FOLDER = """
import json, logging, resource, signal, sys
import torch
from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.serving.adapter_handoff import AdapterHandoff
logging.basicConfig(level=logging.WARNING)
adapter = CanonicalAdapter(adapter_id="a", rank=4, alpha=8.0, scaling=2.0, base_model="m")
adapter.lora_a["q_proj"] = torch.zeros(2, 4, 1024, dtype=torch.bfloat16)
adapter.lora_b["q_proj"] = torch.zeros(2, 1024, 4, dtype=torch.bfloat16)
handoff = AdapterHandoff(__import__("pathlib").Path(sys.argv[1]))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))  # 32 KB will not fit
print(json.dumps([handoff.write(adapter), handoff.write(adapter)]))
"""


def test_a_full_folder_leaves_no_file_and_warns_once(tmp_path: Path) -> None:
    """Writes past 4 KB fail (EFBIG) as writes into a full /dev/shm do (ENOSPC): the
    half-written file goes, the caller is told to use the pipe, and says so once."""
    done = subprocess.run(
        [sys.executable, "-c", _FULL_FOLDER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [None, None]
    assert not list(tmp_path.iterdir())
    assert done.stderr.count("through the pipe") == 1 and "shm_size" in done.stderr


def test_no_folder_means_the_pipe(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    assert AdapterHandoff(tmp_path / "a-file").write(_adapter()) is None  # mkstemp fails
    missing = tmp_path / "gone"
    assert AdapterHandoff(missing).write(_adapter()) is None
    assert not missing.exists()


def test_leftovers_of_this_worker_only_are_removed(tmp_path: Path) -> None:
    handoff = AdapterHandoff(tmp_path)
    unread = [handoff.write(_adapter()), handoff.write(_adapter())]
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
