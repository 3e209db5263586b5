"""One module's mutmut run, in a working directory of its own (`.mutation/<name>/`).

mutmut takes its configuration from the directory it runs in and copies the code and tests
under it into `mutants/`. A directory per module, holding links to the repository's folders
and a `setup.cfg` naming that module and its tests, gives each module its own test set and
its own results, and leaves the repository's files untouched.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tools.mutation.config import Module

ROOT = Path(__file__).resolve().parents[2]
WORK_ROOT = ROOT / ".mutation"
# What the tests import or read, linked into each working directory. pyproject.toml brings
# pytest's settings (pythonpath, asyncio mode, markers); mutmut's own settings go in setup.cfg,
# which mutmut reads because pyproject.toml has no [tool.mutmut] table.
_LINKED = ("services", "kernels", "protos", "tests", "benchmarks", "pyproject.toml")
_ALSO_COPY = ("kernels", "protos", "benchmarks")
MUTMUT = Path(sys.executable).with_name("mutmut")
RUNS_FILE = (
    "runs.txt"  # one line per mutmut run in the directory: what it tested, when, at what commit
)


def work_dir(module: Module) -> Path:
    return WORK_ROOT / module.name


def prepare(module: Module) -> Path:
    """A fresh working directory: mutmut reuses what it finds in `mutants/` (it copies a file
    only when the copy is missing), so a stale copy of an edited file would be tested."""
    work = work_dir(module)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in _LINKED:
        (work / name).symlink_to(ROOT / name)
    cfg = configparser.ConfigParser()
    cfg["mutmut"] = {
        "source_paths": "services",
        "only_mutate": module.path,
        "also_copy": "\n".join(_ALSO_COPY),
        "pytest_add_cli_args_test_selection": "\n".join(module.tests),
        "pytest_add_cli_args": "\n".join(["-p", "no:cacheprovider"]),
    }
    with (work / "setup.cfg").open("w") as f:
        cfg.write(f)
    return work


def run_mutmut(work: Path, max_children: int, mutants: list[str] | None = None) -> int:
    """mutmut's exit status; its output (a progress spinner) goes to `mutmut.log`. With
    `mutants`, only those are tested again and the other results stand."""
    env = dict(os.environ)
    # The tests must import the mutated copy under mutants/, never the repository's code.
    env.pop("PYTHONPATH", None)
    # The tests' tensors are tiny: extra intra-op threads only spin, and mutmut's time limit
    # (RLIMIT_CPU) counts every thread, which turned slow survivors into false "timeouts".
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with (work / "mutmut.log").open("w") as log:
        done = subprocess.run(
            [str(MUTMUT), "run", "--max-children", str(max_children), *(mutants or [])],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    return done.returncode


def mutant_diff(work: Path, mutant: str) -> str:
    """The mutant as a unified diff of its function (`mutmut show`)."""
    done = subprocess.run(
        [str(MUTMUT), "show", mutant], cwd=work, capture_output=True, text=True, check=True
    )
    lines = done.stdout.splitlines()
    # The first line is mutmut's "# name: status" header; the report has its own.
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines)
