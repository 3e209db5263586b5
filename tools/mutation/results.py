"""A module's mutants and what became of each, read from mutmut's result file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tools.mutation.config import Equivalent, Module

# mutmut's exit codes for a mutant (mutmut/stats.py): a failing test run kills it; a run cut
# off by its time limit (an endless loop) also counts as caught.
_KILLED = {1, 3}
_TIMEOUT = {36, 24, -24, 152, 255}
_STATUS = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 37: "type check"}


def status_of(exit_code: int | None) -> str:
    if exit_code in _KILLED:
        return "killed"
    if exit_code in _TIMEOUT:
        return "timeout"
    if exit_code is None:
        return "not checked"
    return _STATUS.get(exit_code, "suspicious")


@dataclass
class Survivor:
    mutant: str
    status: str  # anything but killed or timeout
    diff: str
    equivalent: Equivalent | None = None  # set when equivalent.toml explains it

    @property
    def explained(self) -> bool:
        return self.equivalent is not None


@dataclass
class ModuleResult:
    module: Module
    total: int = 0
    killed: int = 0
    timeout: int = 0
    survivors: list[Survivor] = field(default_factory=list)
    error: str = ""  # why the run gave no results, when it did not
    runs: list[str] = field(default_factory=list)  # the runs these results come from

    @property
    def caught(self) -> int:
        return self.killed + self.timeout

    @property
    def score(self) -> float:
        return self.caught / self.total if self.total else 0.0

    @property
    def unexplained(self) -> list[Survivor]:
        return [s for s in self.survivors if not s.explained]


def exit_codes(work: Path, module: Module) -> dict[str, int | None]:
    meta = work / "mutants" / f"{module.path}.meta"
    with meta.open() as f:
        codes: dict[str, int | None] = json.load(f)["exit_code_by_key"]
    return codes


def added_lines(diff: str) -> list[str]:
    return [
        line[1:].strip() for line in diff.splitlines() if line.startswith("+") and line[:3] != "+++"
    ]


def explain(survivor: Survivor, equivalents: dict[str, Equivalent]) -> None:
    """Attach the equivalence entry of this mutant, if its recorded line is still the one."""
    entry = equivalents.get(survivor.mutant)
    matches = entry is not None and entry.mutated in added_lines(survivor.diff)
    if matches and survivor.status == "survived":
        survivor.equivalent = entry
