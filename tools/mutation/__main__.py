"""`python -m tools.mutation [NAME ...]`: mutate the modules of modules.toml (all, or those
named) one at a time, write `.mutation/report.md`, print the score table.

Exit status 1 when a module's run failed, when a module scores under --min-score, or when a
survivor is not explained in equivalent.toml; 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from tools.mutation.config import Module, load_equivalents, load_modules
from tools.mutation.report import render, score_table
from tools.mutation.results import ModuleResult, Survivor, exit_codes, explain, status_of
from tools.mutation.workdir import (
    ROOT,
    RUNS_FILE,
    WORK_ROOT,
    mutant_diff,
    prepare,
    run_mutmut,
    work_dir,
)


def _parse_args(names: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.mutation", description=__doc__)
    parser.add_argument("modules", nargs="*", metavar="NAME", help=f"one of {names}; all if none")
    parser.add_argument(
        "--max-children", type=int, default=1, help="mutants tested at once (default 1)"
    )
    parser.add_argument(
        "--min-score", type=float, default=0.85, help="lowest passing score (default 0.85)"
    )
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="test again only the mutants the module's last run did not kill, after tests "
        "were added (the module's source unchanged); the other results stand",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: the report of each module's last run (after editing equivalent.toml)",
    )
    return parser.parse_args()


def _work_and_mutants(module: Module, args: argparse.Namespace) -> tuple[Path, list[str] | None]:
    """The module's working directory and which mutants to test: None for all (a fresh
    directory), [] for none (--report-only, or no survivors left)."""
    work = work_dir(module)
    if not (work / "mutants" / f"{module.path}.meta").is_file():
        return prepare(module), None
    if args.report_only:
        return work, []
    if args.survivors:
        codes = exit_codes(work, module)
        return work, [m for m, c in codes.items() if status_of(c) not in ("killed", "timeout")]
    return prepare(module), None


def _tally(result: ModuleResult, work: Path) -> None:
    equivalents = load_equivalents()
    for mutant, code in exit_codes(work, result.module).items():
        result.total += 1
        state = status_of(code)
        if state == "killed":
            result.killed += 1
        elif state == "timeout":
            result.timeout += 1
        else:
            survivor = Survivor(mutant, state, mutant_diff(work, mutant))
            explain(survivor, equivalents)
            result.survivors.append(survivor)


def _mutate(module: Module, args: argparse.Namespace) -> ModuleResult:
    result = ModuleResult(module)
    if args.report_only and not (work_dir(module) / "mutants").is_dir():
        result.error = "never run"
        return result
    started = time.monotonic()
    work, mutants = _work_and_mutants(module, args)
    if mutants != []:
        print(f"{module.name}: mutating {module.path} against {' '.join(module.tests)}", flush=True)
        what = "all mutants" if mutants is None else f"{len(mutants)} survivors again"
        with (work / RUNS_FILE).open("a") as runs:
            runs.write(f"{what}, {_source_state()}\n")
        status = run_mutmut(work, args.max_children, mutants)
        if status != 0:
            result.error = f"mutmut failed (exit {status}; see {work / 'mutmut.log'})"
            print(f"{module.name}: {result.error}", flush=True)
            return result
    _tally(result, work)
    result.runs = (
        (work / RUNS_FILE).read_text().splitlines() if (work / RUNS_FILE).is_file() else []
    )
    print(
        f"{module.name}: {result.caught}/{result.total} caught ({100 * result.score:.1f}%), "
        f"{len(result.unexplained)} survivors not explained, "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )
    return result


def _source_state() -> str:
    """The commit the code and tests were at, for the record of a run."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{datetime.date.today().isoformat()} at {commit}" + (
        " (uncommitted changes)" if dirty else ""
    )


def main() -> int:
    modules = load_modules()
    by_name = {m.name: m for m in modules}
    args = _parse_args(list(by_name))
    unknown = [n for n in args.modules if n not in by_name]
    if unknown:
        print(f"unknown module(s) {unknown}; known: {list(by_name)}", file=sys.stderr)
        return 2
    chosen = [by_name[n] for n in args.modules] if args.modules else modules
    results = [_mutate(m, args) for m in chosen]
    WORK_ROOT.mkdir(exist_ok=True)
    report = WORK_ROOT / "report.md"
    report.write_text(render(results, f"mutmut {version('mutmut')}"))
    print(f"\n{score_table(results)}\n\nsurvivors and their diffs: {report}")
    failed = [r for r in results if r.error or r.score < args.min_score or r.unexplained]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
