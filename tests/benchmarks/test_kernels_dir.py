"""The serving benchmark's results name the `kernels` folder a run imported, so that
experiments.sh capacity_ab's runs with another tree's kernels (a folder holding them, first on
the path) can be told apart from this tree's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRINT_DIR = "from benchmarks.serving_bench import kernels_dir; print(kernels_dir())"


def _kernels_dir(cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": f".:{ROOT}:{ROOT / 'protos'}"}
    run = subprocess.run(
        [sys.executable, "-c", PRINT_DIR], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def test_a_folder_with_kernels_first_on_the_path_is_the_one_named(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    assert _kernels_dir(tmp_path) == str((tmp_path / "kernels").resolve())


def test_this_tree_is_named_otherwise(tmp_path: Path) -> None:
    assert _kernels_dir(tmp_path) == str((ROOT / "kernels").resolve())
